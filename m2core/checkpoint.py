"""Save and load the serving checkpoint directory of DESIGN section 8.

```
DIR/config.json          {"format": "m2-checkpoint", "format_version": 1, "model": M2Config,
                          "modalities": registry, "weights": {file, sha256, num_params},
                          "image_tokenizer": "image_tokenizer" | null,
                          "text_tokenizer": "text_tokenizer.json" | null, "extra": {...}}
DIR/model.safetensors    the model's parameters (no pickle anywhere)
DIR/image_tokenizer/     ImageTokenizer.save_pretrained (optional)
DIR/text_tokenizer.json  TextTokenizer.save (optional)
DIR/MODEL_CARD.md
```

Saving builds the whole directory next to the target and swaps it in, so a reader never
sees half a checkpoint. Loading checks everything it can before using it: the config
(unknown keys, types), every tensor's name and shape against the model the config
describes, the weights' SHA-256 against config.json, the tokenizers' vocabulary sizes
against the model's; each failure is a `CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from m2core.model import M2Config, M2Model

log = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "m2-checkpoint", 1
CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "MODEL_CARD.md"
IMAGE_DIR, TEXT_FILE = "image_tokenizer", "text_tokenizer.json"


class CheckpointError(ValueError):
    """A missing, damaged or mismatched checkpoint file (the message names it)."""


@dataclass
class M2Bundle:
    model: M2Model
    image_tokenizer: Any | None  # m2core.tokenizers.image.ImageTokenizer
    text_tokenizer: Any | None  # m2core.tokenizers.text.TextTokenizer
    pose_tokenizer: Any  # m2core.tokenizers.pose.PoseTokenizer
    config: dict[str, Any]  # config.json as stored
    version: str  # short SHA-256 of model.safetensors


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    directory: str | Path,
    model: M2Model,
    image_tokenizer: Any | None = None,
    text_tokenizer: Any | None = None,
    extra: dict[str, Any] | None = None,
    model_card: str | None = None,
    storage_dtype: str | None = None,
) -> Path:
    """Write the checkpoint directory (replacing an older checkpoint there) -> its path.

    `storage_dtype` ("float16" / "bfloat16") stores the floating-point weights at half size;
    loading copies them into the model's fp32 parameters, so compute stays fp32."""
    directory = Path(directory)
    cfg = model.config
    if image_tokenizer is not None and image_tokenizer.vocab_size != cfg.image_vocab:
        raise ValueError(
            f"image tokenizer has {image_tokenizer.vocab_size} ids, model expects {cfg.image_vocab}"
        )
    if text_tokenizer is not None and text_tokenizer.vocab_size != cfg.text_vocab:
        raise ValueError(
            f"text tokenizer has {text_tokenizer.vocab_size} ids, model expects {cfg.text_vocab}"
        )
    if directory.exists() and not _replaceable(directory):
        raise ValueError(
            f"{directory}: exists and is not an M2 checkpoint; refusing to overwrite it"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        store = None
        if storage_dtype is not None:
            if storage_dtype not in ("float16", "bfloat16"):
                raise ValueError(
                    f"storage_dtype must be float16 or bfloat16, got {storage_dtype!r}"
                )
            store = getattr(torch, storage_dtype)
        # weights that lose too much in half precision stay fp32 (M2Model says which)
        keep = tuple(getattr(model, "FULL_PRECISION", ()))
        state = {
            k: (
                v.detach().to("cpu", store)
                if store and v.is_floating_point() and not k.startswith(keep)
                else v.cpu()
            ).contiguous()
            for k, v in model.state_dict().items()
        }
        save_file(state, tmp / WEIGHTS, metadata={"format": FORMAT})
        if image_tokenizer is not None:
            image_tokenizer.save_pretrained(tmp / IMAGE_DIR)
        if text_tokenizer is not None:
            text_tokenizer.save(tmp)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": cfg.to_dict(),
            "modalities": cfg.registry().to_dict(),
            "weights": {
                "file": WEIGHTS,
                "sha256": _sha256(tmp / WEIGHTS),
                "num_params": model.num_params(),
            },
            "image_tokenizer": IMAGE_DIR if image_tokenizer is not None else None,
            "text_tokenizer": TEXT_FILE if text_tokenizer is not None else None,
            "extra": extra or {},
        }
        try:
            text = json.dumps(meta, indent=2)
        except TypeError as e:
            raise ValueError(f"checkpoint extra must be JSON-serialisable: {e}") from e
        (tmp / CONFIG).write_text(text + "\n")
        (tmp / CARD).write_text(
            model_card if model_card is not None else _default_card(model, meta)
        )
        # mkdtemp makes 0700: a checkpoint is read by other users (a container's, a server's)
        for p in (tmp, *tmp.rglob("*")):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint %s (weights %s)", directory, meta["weights"]["sha256"][:12])
    return directory


def _replaceable(directory: Path) -> bool:
    if not directory.is_dir():
        return False
    if not any(directory.iterdir()):
        return True
    try:
        return json.loads((directory / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _swap_in(tmp: Path, directory: Path) -> None:
    """Rename the finished tmp directory into place; the old one goes only afterwards."""
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.replace(directory, old / "ckpt")
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _default_card(model: M2Model, meta: dict[str, Any]) -> str:
    c = model.config
    lines = [
        "# M2 checkpoint",
        "",
        f"- model: preset `{c.preset}`, dim {c.dim}, {c.enc_layers}+{c.dec_layers} layers, "
        f"{c.heads} heads, {model.num_params() / 1e6:.2f}M parameters "
        f"({model.num_params(body_only=True) / 1e6:.2f}M in the transformer body)",
        f"- vocabularies: image {c.image_vocab}, captions {c.text_vocab} (max {c.caption_len} tokens)",
        f"- weights sha256: `{meta['weights']['sha256']}`",
    ]
    if meta["extra"]:
        lines += [
            "",
            "## Training and evaluation",
            "",
            "```json",
            json.dumps(meta["extra"], indent=2),
            "```",
        ]
    return "\n".join(lines) + "\n"


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not an M2 checkpoint directory?)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an M2 checkpoint config (format must be {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta.get('format_version')!r} is not supported (need {FORMAT_VERSION})"
        )
    return meta


def _check_tensors(path: Path, state: dict[str, torch.Tensor], model: M2Model) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(
            f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)"
        )
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected tensors {unexpected[:5]} ({len(unexpected)} in all)"
        )
    for name, t in expected.items():
        got = state[name]
        if got.shape != t.shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(got.shape)}, config.json's model needs {tuple(t.shape)}"
            )
        if not got.is_floating_point():
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {got.dtype}, expected floating point"
            )


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> M2Bundle:
    """Load and check a checkpoint directory -> M2Bundle (model in eval mode on device)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    meta = _read_config(d / CONFIG)
    try:
        if isinstance(meta.get("model"), dict) and meta["model"].get("format") == 2:
            from m2core.model_v2 import M2ConfigV2, M2ModelV2

            mcfg, build = M2ConfigV2.from_dict(meta["model"]), M2ModelV2
        else:
            mcfg, build = M2Config.from_dict(meta["model"]), M2Model
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / CONFIG}: bad model config: {e}") from e
    weights = d / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{weights}: damaged or not a safetensors file ({e})") from e
    model = build(mcfg)
    _check_tensors(weights, state, model)
    sha = _sha256(weights)
    recorded = (meta.get("weights") or {}).get("sha256")
    if recorded is not None and recorded != sha:
        raise CheckpointError(
            f"{weights}: contents differ from the sha256 recorded in config.json (damaged or replaced)"
        )
    model.load_state_dict(state, strict=True)
    model.to(device).eval()

    image_tok = text_tok = None
    if meta.get("image_tokenizer") or (d / IMAGE_DIR).is_dir():
        from m2core.tokenizers.image import ImageTokenizer  # lazy: torch-heavy, optional

        try:
            image_tok = ImageTokenizer.from_pretrained(d / IMAGE_DIR)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{d / IMAGE_DIR}: cannot load the image tokenizer: {e}") from e
        if image_tok.vocab_size != mcfg.image_vocab:
            raise CheckpointError(
                f"{d / IMAGE_DIR}: {image_tok.vocab_size} ids, the model expects {mcfg.image_vocab}"
            )
        image_tok = image_tok.to(device).eval()
    if meta.get("text_tokenizer") or (d / TEXT_FILE).is_file():
        from m2core.tokenizers.text import TextTokenizer

        try:
            text_tok = TextTokenizer.load(d)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{d / TEXT_FILE}: cannot load the text tokenizer: {e}") from e
        if text_tok.vocab_size != mcfg.text_vocab:
            raise CheckpointError(
                f"{d / TEXT_FILE}: {text_tok.vocab_size} ids, the model expects {mcfg.text_vocab}"
            )
    from m2core.tokenizers.pose import PoseTokenizer

    return M2Bundle(model, image_tok, text_tok, PoseTokenizer(), meta, sha[:12])
