"""Checkpoint directory: round trip with tokenizers, and clear refusals of bad files."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from m2core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from m2core.masking import MaskingConfig, collate, mask_sample, random_sample
from m2core.model import M2Config, M2Model
from m2core.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from m2core.tokenizers.text import TextTokenizer

SMALL = {"dim": 64, "enc_layers": 1, "dec_layers": 1, "heads": 4, "caption_len": 16}


@pytest.fixture(scope="module")
def tokenizers():
    text = TextTokenizer.build(["a person waves both arms", "a figure jumps"], max_len=16)
    torch.manual_seed(0)
    image = ImageTokenizer(ImageTokenizerConfig(levels=(4, 4), channels=(4, 4, 4, 4), res_blocks=0))
    return image, text


def _model(image_vocab, text_vocab, seed=0, **kw):
    torch.manual_seed(seed)
    return M2Model(M2Config(**{**SMALL, **kw}, image_vocab=image_vocab, text_vocab=text_vocab))


def _batch(image_vocab, text_vocab):
    rng = np.random.default_rng(0)
    cfg = MaskingConfig(24, 24)
    return collate(
        [mask_sample(random_sample(rng, image_vocab, text_vocab, 16), cfg, rng) for _ in range(3)]
    )


@pytest.fixture()
def saved(tmp_path, tokenizers):
    image, text = tokenizers
    model = _model(image.vocab_size, text.vocab_size)
    path = save_checkpoint(
        tmp_path / "ckpt", model, image, text, extra={"data": "synthetic", "ce": 1.5}
    )
    return path, model


def test_save_load_round_trip_gives_identical_logits_and_tokenizers(saved, tokenizers):
    path, model = saved
    image, text = tokenizers
    assert {p.name for p in path.iterdir()} == {
        "config.json", "model.safetensors", "image_tokenizer", "text_tokenizer.json", "MODEL_CARD.md",
    }  # fmt: skip
    bundle = load_checkpoint(path)
    assert bundle.config["extra"] == {"data": "synthetic", "ce": 1.5}
    assert bundle.model.config == model.config and not bundle.model.training
    batch = _batch(image.vocab_size, text.vocab_size)
    with torch.no_grad():
        (a, la), (b, lb) = model.eval()(batch), bundle.model(batch)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(la, lb)
    assert bundle.text_tokenizer.sha256 == text.sha256
    frames = torch.randint(0, 256, (1, 256, 256, 3), dtype=torch.uint8)
    assert torch.equal(bundle.image_tokenizer.encode(frames), image.encode(frames))
    assert bundle.pose_tokenizer.encode(np.zeros((13, 3))).shape == (39,)
    assert len(bundle.version) == 12 and bundle.version == load_checkpoint(path).version
    assert "synthetic" in (path / "MODEL_CARD.md").read_text()


def test_saving_again_replaces_the_checkpoint_atomically(saved, tokenizers):
    path, _ = saved
    image, text = tokenizers
    other = _model(image.vocab_size, text.vocab_size, seed=1)
    save_checkpoint(path, other)
    assert not (path / "image_tokenizer").exists()
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]  # no temporary leftovers
    assert load_checkpoint(path).version != ""
    (path.parent / "notes").mkdir()
    (path.parent / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an M2 checkpoint"):
        save_checkpoint(path.parent / "notes", other)
    with pytest.raises(ValueError, match="text tokenizer has"):
        save_checkpoint(path, _model(image.vocab_size, 999), text_tokenizer=text)


def test_missing_tensor_is_refused(saved):
    path, _ = saved
    state = load_file(path / "model.safetensors")
    del state["decoder.0.mlp.down.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: missing tensors \['decoder\.0\.mlp\.down\.weight'\]",
    ):
        load_checkpoint(path)


def test_wrong_shape_is_refused(saved, tokenizers):
    path, _ = saved
    image, text = tokenizers
    wider = _model(image.vocab_size, text.vocab_size, dim=128)
    save_file(
        {k: v.contiguous() for k, v in wider.state_dict().items()}, path / "model.safetensors"
    )
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor '.*' has shape \(.*128.*\), config\.json's model needs",
    ):
        load_checkpoint(path)


def test_truncated_or_altered_weights_are_refused(saved):
    path, _ = saved
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: damaged or not a safetensors file"
    ):
        load_checkpoint(path)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF  # same size, valid header, one weight changed
    weights.write_bytes(bytes(flipped))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: contents differ from the sha256"
    ):
        load_checkpoint(path)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(path)


def test_bad_config_and_tokenizer_files_are_refused(saved, tmp_path):
    path, _ = saved
    config = path / "config.json"
    good = json.loads(config.read_text())
    config.write_text(json.dumps({**good, "model": {**good["model"], "depth": 3}}))
    with pytest.raises(
        CheckpointError, match=r"config\.json: bad model config: unknown model config key 'depth'"
    ):
        load_checkpoint(path)
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(path)
    config.write_text(json.dumps(good))
    (path / "text_tokenizer.json").write_text("[]")
    with pytest.raises(
        CheckpointError, match=r"text_tokenizer\.json: cannot load the text tokenizer"
    ):
        load_checkpoint(path)
    (path / "text_tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"text_tokenizer\.json: cannot load"):
        load_checkpoint(path)  # config.json lists it, so its absence is an error
    config.unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_checkpoint(tmp_path / "nowhere")


def test_half_precision_storage_halves_the_file_and_loads_back_to_fp32(tmp_path, tokenizers):
    image, text = tokenizers
    model = _model(image.vocab_size, text.vocab_size)
    full = save_checkpoint(tmp_path / "fp32", model, image, text)
    half = save_checkpoint(tmp_path / "fp16", model, image, text, storage_dtype="float16")
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.55 * size(full)
    # readable by other users (a container's non-root user, a server account)
    assert half.stat().st_mode & 0o777 == 0o755
    assert {(p.stat().st_mode & 0o777) for p in half.rglob("*") if p.is_file()} == {0o644}
    bundle = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in bundle.model.parameters())
    batch = _batch(image.vocab_size, text.vocab_size)
    with torch.no_grad():
        (a, _), (b, _) = model.eval()(batch), bundle.model(batch)
    assert all(torch.allclose(a[k], b[k], atol=1e-2, rtol=1e-2) for k in a)
    with pytest.raises(ValueError, match="storage_dtype"):
        save_checkpoint(tmp_path / "bad", model, storage_dtype="int8")


def test_half_precision_keeps_a_converted_pose_basis_in_fp32(tmp_path, tokenizers):
    """A pose basis fitted from trained (noisy) per-bin tables has large, cancelling terms:
    those tensors stay fp32 in an fp16 checkpoint, so the pose logits survive packing."""
    from safetensors import safe_open

    image, text = tokenizers
    table = _model(image.vocab_size, text.vocab_size)
    with torch.no_grad():
        table.tok_emb.weight.add_(torch.randn_like(table.tok_emb.weight) * 0.02)  # "trained"
        for name in ("coords", "coords_next"):
            table.heads[name].weight.add_(torch.randn_like(table.heads[name].weight) * 0.02)
    model = _model(image.vocab_size, text.vocab_size, pose_basis=True)
    model.load_state_dict(model.adapt_state_dict(table.state_dict()))
    half = save_checkpoint(tmp_path / "fp16", model, image, text, storage_dtype="float16")
    with safe_open(str(half / "model.safetensors"), "pt") as f:
        assert f.get_slice("pose_value.weight").get_dtype() == "F32"
        assert f.get_slice("encoder.0.attn.qkv.weight").get_dtype() == "F16"
    batch = _batch(image.vocab_size, text.vocab_size)
    with torch.no_grad():
        (a, _), (b, _) = model.eval()(batch), load_checkpoint(half).model(batch)
    for name in ("coords", "coords_next"):
        if name in a:
            assert torch.allclose(a[name], b[name], atol=1.0), (
                (a[name] - b[name]).abs().max()
            )  # 68+ in fp16
