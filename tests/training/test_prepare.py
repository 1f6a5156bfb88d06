"""`m2 prepare`: synthetic clips -> token shards, split by clip, resumable, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from m2core.geometry import letterbox, load_image
from m2core.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from m2core.tokenizers.pose import PoseTokenizer
from m2core.tokenizers.text import TextTokenizer
from training.data.penn_action import read_clip
from training.data.prepare import PrepareOptions, main, prepare
from training.data.prepare_clip import PIXEL_CENTRE, future_offsets, key_frames
from training.data.shard_writer import ARRAYS, assign_splits


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from training.synth.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, clips=6, seed=0, workers=1, frames=(20, 26), progress=False)
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """A real (randomly initialised, small) image tokenizer: prepare only needs its ids."""
    torch.manual_seed(0)
    tok = ImageTokenizer(ImageTokenizerConfig(levels=(4, 4), channels=(8, 8, 16, 16), res_blocks=0))
    return tok.save_pretrained(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def prepared(synth, tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "out"
    prepare(PrepareOptions(synth, tokenizer, out, workers=2, val_fraction=0.25))
    return out


def _arrays(root: Path, split: str) -> dict[str, np.ndarray]:
    return {k: np.load(root / split / f"{k}.npy", mmap_mode="r") for k in ARRAYS}


def test_shards_match_meta_and_are_memory_mapped(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    assert (
        meta["image_vocab"] == 16 and meta["stride"] == 6 and meta["source"]["kind"] == "synthetic"
    )
    text = TextTokenizer.load(prepared)
    assert (
        meta["text_vocab"] == text.vocab_size and meta["tokenizers"]["text_sha256"] == text.sha256
    )
    assert ImageTokenizer.from_pretrained(prepared / "image_tokenizer").vocab_size == 16
    widths = {"tok_rgb": 256, "tok_rgb_next": 256, "coords": 39, "coords_next": 234, "captions": 32}
    for split, c in meta["counts"].items():
        arrs = _arrays(prepared, split)
        assert all(isinstance(a, np.memmap) and len(a) == c["samples"] for a in arrs.values())
        for name, w in widths.items():
            assert arrs[name].shape[1:] == (w,) and arrs[name].dtype == np.uint16
        assert len(set(np.asarray(arrs["clip"]).tolist())) == c["clips"]
    assert meta["counts"]["train"]["samples"] > 0 and meta["counts"]["val"]["samples"] > 0
    assert not (prepared / ".work").exists()  # scratch removed once complete


def test_split_is_by_clip_with_penn_actions_own_test_flag(prepared, synth):
    meta = json.loads((prepared / "meta.json").read_text())
    clips = {
        s: {meta["clip_ids"][i] for i in np.asarray(_arrays(prepared, s)["clip"])}
        for s in meta["counts"]
    }
    assert not clips["train"] & clips["val"] and not clips["train"] & clips["test"]
    assert not clips["val"] & clips["test"]
    flags = {
        c: scipy.io.loadmat(synth / "labels" / f"{c}.mat")["train"].item() for c in meta["clip_ids"]
    }
    assert clips["test"] == {c for c, f in flags.items() if f == -1} != set()
    # the validation share is a seeded choice of training clips, stable for a seed
    split = assign_splits({c: f == 1 for c, f in flags.items()}, 0.25, 0)
    assert {c for c, s in split.items() if s == "val"} == clips["val"]


def test_samples_hold_the_right_frames_poses_and_captions(prepared, synth):
    meta = json.loads((prepared / "meta.json").read_text())
    arrs = _arrays(prepared, "train")
    i = 1  # second key frame of the first training clip
    clip = read_clip(synth, meta["clip_ids"][int(arrs["clip"][i])])
    t = int(arrs["frame"][i])
    assert t in key_frames(clip.nframes, 6) and t + 6 < clip.nframes
    frame, lb = letterbox(load_image(clip.frame_path(t)))
    tok = ImageTokenizer.from_pretrained(prepared / "image_tokenizer")
    assert np.array_equal(tok.encode(frame[None]).reshape(256).numpy(), arrs["tok_rgb"][i])
    nxt, _ = letterbox(load_image(clip.frame_path(t + 6)))
    assert np.array_equal(tok.encode(nxt[None]).reshape(256).numpy(), arrs["tok_rgb_next"][i])
    pose = PoseTokenizer()
    got = pose.decode_future(np.asarray(arrs["coords_next"][i], np.int64))
    for k, off in enumerate(future_offsets(6)):
        j = clip.joints(t + off)
        want = lb.to_frame(j[:, :2] - PIXEL_CENTRE)
        vis = clip.visibility[t + off]
        assert np.allclose(got[k, vis, :2], np.clip(want[vis], 0, 1), atol=1 / 8192)
        assert np.array_equal(got[k, :, 2] > 0.5, vis)
    text = TextTokenizer.load(prepared)
    assert text.decode(np.asarray(arrs["captions"][i], np.int64)) == clip.captions[t]


def test_future_offsets_end_at_the_next_key_frame():
    assert future_offsets(6) == [1, 2, 3, 4, 5, 6]
    assert future_offsets(12) == [2, 4, 6, 8, 10, 12]
    assert future_offsets(3)[-1] == 3


def test_interrupted_run_leaves_no_complete_looking_output_and_resumes(
    synth, tokenizer, prepared, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    label = data / "labels" / "0004.mat"
    good = label.read_bytes()
    label.write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    out = tmp_path / "out"
    opts = PrepareOptions(data, tokenizer, out, workers=0, val_fraction=0.25)
    with pytest.raises(ValueError, match="0004"):
        prepare(opts)
    assert not (out / "meta.json").exists()  # nothing looks complete
    assert len(list((out / ".work" / "clips").glob("*.npz"))) == 3  # clips 1-3 are kept
    label.write_bytes(good)
    prepare(opts)  # picks up at clip 4
    for split in ("train", "val", "test"):
        a, b = _arrays(out, split), _arrays(prepared, split)
        assert all(np.array_equal(a[k], b[k]) for k in ARRAYS)


def test_broken_inputs_give_one_line_errors(synth, tokenizer, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    (data / "frames" / "0002" / "000007.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code = main(
        [
            "--data",
            str(data),
            "--tokenizer",
            str(tokenizer),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "0",
        ]
    )
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert code == 2 and last.startswith("m2 prepare: error:") and "000007.jpg" in last
    assert "Traceback" not in err
    assert (
        main(
            [
                "--data",
                str(tmp_path / "none"),
                "--tokenizer",
                str(tokenizer),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert (
        main(["--data", str(data), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    )
    assert main(["--data", str(data), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "o"),
                 "--captioner", "gpt:x"]) == 2  # fmt: skip
    # --skip-bad drops the broken clip and says so in meta.json
    code = main(["--data", str(data), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "o"),
                 "--workers", "0", "--skip-bad"])  # fmt: skip
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert code == 0 and meta["skipped_clips"] == ["0002"] and "0002" not in meta["clip_ids"]


def test_template_captions_when_the_data_has_none(synth, tokenizer, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth, data, ignore=shutil.ignore_patterns("captions.json"))
    meta = prepare(PrepareOptions(data, tokenizer, tmp_path / "o", workers=0))
    assert meta["captions_from"] == "template"
    text = TextTokenizer.load(tmp_path / "o")
    arrs = _arrays(tmp_path / "o", "train")
    caption = text.decode(np.asarray(arrs["captions"][0], np.int64))
    action = meta["actions"][int(arrs["action"][0])].replace("_", " ")
    assert caption.startswith(f"a person doing {action}")


def _tiny_blip(path: Path) -> None:
    """A randomly initialised BLIP with a 15-word vocabulary (no download)."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipProcessor,
    )
    from transformers import BlipImageProcessorPil as ImageProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "person", "jumps", "waves",
             "the", "arm", "red", "man", "walks"]  # fmt: skip
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]")
    text = dict(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, bos_token_id=5, sep_token_id=3, pad_token_id=0, eos_token_id=3)  # fmt: skip
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  image_size=32, patch_size=16)  # fmt: skip
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    model.save_pretrained(path)
    BlipProcessor(
        image_processor=ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
    ).save_pretrained(path)


def test_blip_captioner_from_a_local_checkpoint(synth, tokenizer, tmp_path):
    from training.data.captioners import BlipCaptioner

    blip = tmp_path / "blip"
    _tiny_blip(blip)
    data = tmp_path / "data"  # two clips keep BLIP's generate calls few
    for sub in ("labels/0001.mat", "labels/0002.mat", "frames/0001", "frames/0002"):
        (data / sub).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (synth / sub).is_dir() else shutil.copy)(synth / sub, data / sub)
    out = tmp_path / "o"
    opts = PrepareOptions(data, tokenizer, out, workers=0, val_fraction=0, captioner=f"blip:{blip}",
                          caption_len=10)  # fmt: skip
    meta = prepare(opts)
    assert meta["captions_from"] == f"blip:{blip}"
    arrs = _arrays(out, "train")
    clip = read_clip(data, meta["clip_ids"][int(arrs["clip"][0])])
    frame, _ = letterbox(load_image(clip.frame_path(int(arrs["frame"][0]))))
    want = BlipCaptioner(blip, max_new_tokens=8)(frame[None])[0]
    got = TextTokenizer.load(out).decode(np.asarray(arrs["captions"][0], np.int64))
    assert got and want.startswith(got)  # the stored caption is BLIP's (cut to caption_len)


def test_hop_makes_overlapping_samples_from_each_frame_once(synth, tokenizer, tmp_path):
    """--hop 2 with stride 6: key frames 0, 2, 4, ... each paired with t + 6, the same
    tokens as the default layout where the two share a frame."""
    out = prepare(PrepareOptions(synth, tokenizer, tmp_path / "h", hop=2, workers=0,
                                 val_fraction=0.25))  # fmt: skip
    assert out["hop"] == 2 and out["stride"] == 6
    arrs = _arrays(tmp_path / "h", "train")
    meta = json.loads((tmp_path / "h" / "meta.json").read_text())
    first = np.flatnonzero(arrs["clip"] == arrs["clip"][0])
    clip = read_clip(synth, meta["clip_ids"][int(arrs["clip"][0])])
    assert (
        list(arrs["frame"][first])
        == key_frames(clip.nframes, 6, 2)
        == list(range(0, clip.nframes - 6, 2))
    )
    # the sample at t = 0 pairs frame 0 with frame 6, which is also the sample t = 6's now
    k0, k6 = first[0], first[3]
    assert arrs["frame"][k6] == 6
    assert np.array_equal(arrs["tok_rgb_next"][k0], arrs["tok_rgb"][k6])
    tok = ImageTokenizer.from_pretrained(tmp_path / "h" / "image_tokenizer")
    frame, _ = letterbox(load_image(clip.frame_path(2)))
    assert np.array_equal(tok.encode(frame[None]).reshape(256).numpy(), arrs["tok_rgb"][first[1]])


def test_a_switching_clip_gives_each_sample_its_own_action(tokenizer, tmp_path):
    from training.synth.synth import generate

    data = tmp_path / "synth"
    generate(data, clips=3, seed=2, workers=1, frames=(60, 60), progress=False, switch_share=1.0)
    prepare(PrepareOptions(data, tokenizer, tmp_path / "p", workers=0, val_fraction=0.0))
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    switched = 0
    for split in ("train", "test"):
        arrs = _arrays(tmp_path / "p", split)
        for k in range(len(arrs["clip"])):
            clip = read_clip(data, meta["clip_ids"][int(arrs["clip"][k])])
            labels = clip.frame_action or [clip.action] * clip.nframes
            assert meta["actions"][int(arrs["action"][k])] == labels[int(arrs["frame"][k])]
            switched += labels[int(arrs["frame"][k])] != clip.action
    assert switched > 0
