"""The second half of `m2 prepare`: per-clip results cached under `.work/` -> the split
folders of `.npy` arrays, the tokenizers and `meta.json` (written last, so a folder
without it reads as unfinished). Every file is written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m2core.tokenizers.image import atomic_write
from training.data.prepare_clip import PrepareError, future_offsets

if TYPE_CHECKING:
    from training.data.prepare import PrepareOptions

log = logging.getLogger(__name__)

FORMAT = "m2-shards/1"
SPLITS = ("train", "val", "test")
ARRAYS = ("tok_rgb", "tok_rgb_next", "coords", "coords_next", "coords_prev", "captions",
          "bbox", "clip", "frame", "action")  # fmt: skip


def file_sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _to_file(path: Path, save) -> None:
    # numpy appends ".npy" to a path without it, so it writes through an open file
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            save(f)

    atomic_write(path, write)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    _to_file(path, lambda f: np.savez(f, **arrays))


def save_npy(path: Path, array: np.ndarray) -> None:
    _to_file(path, lambda f: np.save(f, array))


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))


def ids_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _actions(r: dict) -> list[str]:
    """A clip's per-sample labels (a clip prepared by an older version holds one string)."""
    return np.broadcast_to(np.asarray(r["action"], dtype=str), (len(r["frame"]),)).tolist()


def assign_splits(clips: dict[str, bool], val_fraction: float, seed: int) -> dict[str, str]:
    """clip id -> split. Test = the dataset's own test flag; val = a seeded share of train."""
    train = sorted(c for c, is_train in clips.items() if is_train)
    rng = np.random.default_rng(seed)
    n_val = round(len(train) * val_fraction)
    if val_fraction > 0 and len(train) >= 2:
        n_val = max(1, n_val)
    val = set(rng.permutation(train)[:n_val].tolist()) if n_val else set()
    return {c: ("test" if not t else "val" if c in val else "train") for c, t in clips.items()}


def load_cached(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise PrepareError(f"{path}: damaged cache file ({e}); delete it and rerun") from None
    arrays.update(json.loads(str(arrays.pop("info"))))
    return arrays


def write_shards(
    opts: PrepareOptions, clip_ids: list[str], bad: list[str], work: Path, tok_dir: Path,
    tok_hash: str, image_vocab: int,
) -> dict[str, Any]:  # fmt: skip
    """The cached clips -> one folder per split, the tokenizers, then meta.json (last)."""
    from m2core.tokenizers.text import TextTokenizer

    clips = {c: load_cached(work / "clips" / f"{c}.npz") for c in clip_ids if c not in bad}
    if opts.all_to is not None:
        splits = dict.fromkeys(clips, opts.all_to)
    else:
        splits = assign_splits(
            {c: r["train"] for c, r in clips.items()}, opts.val_fraction, opts.seed
        )
    given = opts.tokenizer / "text_tokenizer.json"
    if given.is_file():
        # --tokenizer is a serving checkpoint: keep its caption ids, so these shards can
        # evaluate (or fine-tune) that checkpoint.
        text = TextTokenizer.load(opts.tokenizer)
        log.info("captions use the text tokenizer of %s", opts.tokenizer)
    else:
        train_caps = [
            s for c, r in clips.items() if splits[c] == "train" for s in r["captions"].tolist()
        ]
        if not train_caps:
            raise PrepareError(
                "no training samples: every clip is too short for the stride or held out"
            )
        text = TextTokenizer.build(train_caps, vocab=opts.caption_vocab, max_len=opts.caption_len)
    actions = sorted({a for r in clips.values() for a in _actions(r)})
    order = list(clips)
    out = opts.out
    counts: dict[str, dict[str, int]] = {}
    id_dt = ids_dtype(max(image_vocab, text.vocab_size, 8194))
    for split in SPLITS:
        rows = [c for c in order if splits[c] == split]
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
        for c in rows:
            r = clips[c]
            n = len(r["frame"])
            for k in ("tok_rgb", "tok_rgb_next", "coords", "coords_next", "coords_prev"):
                parts[k].append(r[k].astype(id_dt))
            parts["captions"].append(
                text.encode_batch(r["captions"].tolist()).astype(id_dt).reshape(n, -1)
            )
            parts["bbox"].append(r["bbox"].astype(np.float32))
            parts["frame"].append(r["frame"].astype(np.int32))
            parts["clip"].append(np.full(n, order.index(c), np.int32))
            parts["action"].append(np.array([actions.index(a) for a in _actions(r)], np.int16))
        d = out / split
        d.mkdir(exist_ok=True)
        n_samples = 0
        for k in ARRAYS:
            arr = np.concatenate(parts[k]) if parts[k] else _empty(k, id_dt, text.max_len)
            save_npy(d / f"{k}.npy", arr)
            n_samples = len(arr)
        counts[split] = {
            "samples": n_samples,
            "clips": sum(1 for c in rows if len(clips[c]["frame"])),
        }
    text.save(out)
    shutil.copytree(tok_dir, out / ".image_tokenizer.tmp", dirs_exist_ok=True)
    shutil.rmtree(out / "image_tokenizer", ignore_errors=True)
    os.replace(out / ".image_tokenizer.tmp", out / "image_tokenizer")
    source = "synthetic" if (opts.data / "synth.json").is_file() else "penn_action"
    meta = {
        "format": FORMAT,
        "counts": counts,
        "image_vocab": int(image_vocab),
        "text_vocab": int(text.vocab_size),
        "caption_len": int(text.max_len),
        "caption_vocab": opts.caption_vocab,
        "stride": opts.stride,
        "hop": opts.hop or opts.stride,
        "future_offsets": future_offsets(opts.stride),
        "source": {
            "kind": source,
            "path": str(opts.data.resolve()),
            "synth": _read_json(opts.data / "synth.json"),
        },
        "captions_from": _captions_from(
            opts.captioner, [r["has_captions"] for r in clips.values()]
        ),
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "actions": actions,
        "clip_ids": order,
        "clip_splits": {c: splits[c] for c in order},
        "skipped_clips": bad,
        "tokenizers": {"image_sha256": tok_hash, "text_sha256": text.sha256},
        "arrays": {
            k: str(np.load(out / "train" / f"{k}.npy", mmap_mode="r").dtype) for k in ARRAYS
        },
    }
    write_json(out / "meta.json", meta)
    shutil.rmtree(work, ignore_errors=True)
    return meta


def _captions_from(captioner: str, has: list[bool]) -> str:
    if captioner != "template":
        return captioner
    return "dataset" if all(has) else "dataset+template" if any(has) else "template"


def _empty(name: str, id_dt: np.dtype, caption_len: int) -> np.ndarray:
    cols = {"tok_rgb": 256, "tok_rgb_next": 256, "coords": 39, "coords_next": 234,
            "coords_prev": 39, "captions": caption_len, "bbox": 4}  # fmt: skip
    dt = {"bbox": np.float32, "clip": np.int32, "frame": np.int32, "action": np.int16}.get(
        name, id_dt
    )
    return np.zeros((0, cols[name]) if name in cols else (0,), dtype=dt)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None
