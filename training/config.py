"""The training config: a typed, frozen dataclass read from YAML plus `key=value` overrides.

The research note's keys are accepted as they are written (`batch_size` per device,
`total_tokens` / `warmup_tokens` in millions, `token_warmup` as a synonym,
`num_tokens_per_sample` split into input and target halves, `lr` -> `min_lr` cosine,
`weight_decay`, `clip_grad`, `dtype`). Everything else M2 needs has a typed field below.

Rules:
- The YAML file sets values, `key=value` overrides win; each value is parsed with
  `yaml.safe_load`, so `lr=3e-4`, `resume=none` and `model={dim: 64}` all work.
- Keys are flat. Fields that hold a mapping (`model`, `input_alphas`, `target_alphas`,
  `short_batch`, `read_noise`) also take dotted overrides: `model.dim=64`, `short_batch.batch_size=32`.
- An unknown key is an error that names it (and the closest known key).
- Token counts (`total_tokens`, `warmup_tokens`, `eval_interval`, `checkpoint_interval`)
  are in millions of tokens, as in the note; a string with a suffix is an exact count
  (`"200K"`, `"1.5M"`, `"5B"`, or `"640"` tokens).
- A token is one slot of a sample's budget: a step consumes
  `batch_size x num_processes x grad_accum x num_tokens_per_sample` tokens, plus the
  short batch's samples times their budget.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.builders import masking_config, short_batch

SYNONYMS = {"token_warmup": "warmup_tokens", "gradient_accumulation_steps": "grad_accum"}
DTYPES = ("fp32", "bf16", "fp16")
_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}


@dataclass(frozen=True)
class TrainConfig:
    """Everything `train()` reads. Token quantities are in millions of tokens."""

    # --- where -------------------------------------------------------------------------
    data_dir: str = "data/prepared"  # what `m2 prepare` wrote
    output_dir: str = "runs/m2"  # checkpoints/, logs/, final/
    # --- the note's keys ---------------------------------------------------------------
    batch_size: int = 128  # samples per device per micro-step
    total_tokens: float = 5000.0  # millions
    warmup_tokens: float = 500.0  # millions (synonym: token_warmup)
    num_tokens_per_sample: int = 256
    num_input_tokens: int | None = None  # default: half of num_tokens_per_sample
    num_target_tokens: int | None = None  # default: the rest
    lr: float = 6e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05  # not on norms, biases, embeddings
    clip_grad: float = 1.0  # 0 disables
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (with a gradient scaler)
    # --- optimisation ------------------------------------------------------------------
    grad_accum: int = 1
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    # --- model and masking ------------------------------------------------------------
    model_preset: str = "base"
    model: dict[str, Any] = field(default_factory=dict)  # overrides of M2Config fields
    input_alphas: dict[str, float] = field(default_factory=dict)  # {} = masking's default
    target_alphas: dict[str, float] = field(default_factory=dict)
    alpha_mixtures: list[dict[str, Any]] = field(
        default_factory=list
    )  # [{inputs, targets, weight}]
    reveal_prob: float = 0.5  # share of image/pose targets that reveal part of themselves (MaskGIT)
    # Share of samples whose present skeleton (when not a target) enters with read-like error,
    # and that error's std per joint group in frame units (m2core/masking.py, step 6).
    read_noise_prob: float = 0.0
    read_noise: dict[str, float] = field(default_factory=dict)  # {head: 0.03, ...}
    # Training samples a step whose skeleton now and future also train the forecast's motion
    # path alone (no trunk pass, not counted as tokens); needs model.motion_dense. 0 = off.
    motion_batch: int = 0
    # Training frames a step that also train the skeleton's heat map alone (through the image
    # adapter's stem, no trunk pass, not counted as tokens); needs model.read_heat. 0 = off.
    read_batch: int = 0
    # A second batch every step, of short samples with their own budget and mixtures (say the
    # skeleton alone, a third of a full sample's tokens): {batch_size, input_tokens,
    # target_tokens, alpha_mixtures, weight}; its loss is added times weight. {} = off.
    short_batch: dict[str, Any] = field(default_factory=dict)
    # --- evaluation, checkpoints, logging ----------------------------------------------
    eval_interval: float = 100.0  # millions of tokens; 0 = only at the end
    eval_samples: int = 1024  # validation samples per evaluation
    checkpoint_interval: float = 250.0  # millions of tokens; 0 = only at the end
    keep_checkpoints: int = 3
    resume: str = "auto"  # auto | none | path of a checkpoint directory
    # Fine-tune: start from these weights (a serving or training checkpoint directory) with
    # a fresh optimizer and schedule. Ignored when the run resumes from its own checkpoint.
    init_from: str | None = None
    # With model.pose_context and model.action_classes: fit the pose context's hidden layer
    # and action head alone for this many steps (batches of 256 training skeletons, a few
    # seconds on a CPU) before training starts (training/pose_context.py). 0 = off.
    context_warmup_steps: int = 0
    stop_after_steps: int | None = None  # stop early (checkpoint, no export): like a kill
    # Wall-clock budget in minutes (0 = off): after a short calibration the run measures its
    # speed and cuts total_tokens (an upper bound then) so that training, the last
    # evaluation and the export end within the budget; the lr schedule follows the new total,
    # and later speed checks cut it again if the machine slows down.
    time_budget: float = 0.0
    export: bool = True  # write output_dir/final/ at the end (false: `m2 export` it later)
    log_interval: int = 10  # steps between log lines / tracker rows
    num_workers: int = 2  # DataLoader workers per process
    plan_devices: int | None = None  # device count the printed plan assumes
    cpu: bool = False  # force CPU even where CUDA is present
    tf32: bool = False  # let fp32 matmuls use TF32 tensor cores on GPU (off = true fp32)
    peak_flops: float | None = None  # per device, for MFU; None = guess from the GPU name
    project: str = "m2"

    def __post_init__(self) -> None:
        _validate(self)

    # --- derived ------------------------------------------------------------------------
    @property
    def input_tokens(self) -> int:
        return _split_tokens(self)[0]

    @property
    def target_tokens(self) -> int:
        return _split_tokens(self)[1]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


# --- loading ----------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read `path` (YAML mapping), apply `key=value` overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of keys, got {type(loaded).__name__}")
        values = _canonical_keys(loaded, source=str(path))
    _apply_overrides(values, overrides)
    return config_from_dict(values)


def _apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> None:
    """Apply `key=value` overrides (values parsed as YAML) to `values` in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value")
        _apply_override(values, key.strip(), _parse_value(raw))


def make_config(
    source: TrainConfig | Mapping[str, Any] | str | Path | None, overrides: Sequence[str] = ()
) -> TrainConfig:
    """A config from a TrainConfig, a mapping or a YAML path, with `key=value` overrides."""
    if source is None or isinstance(source, str | Path):
        return load_config(source, overrides)
    values = (
        source.to_dict()
        if isinstance(source, TrainConfig)
        else _canonical_keys(dict(source), "config")
    )
    _apply_overrides(values, overrides)
    return config_from_dict(values)


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a flat mapping (synonyms allowed, types checked)."""
    values = _canonical_keys(dict(values), source="config")
    hints = typing.get_type_hints(TrainConfig)
    kwargs = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    return TrainConfig(**kwargs)


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _unknown(key: str, source: str) -> ValueError:
    names = _field_names() + list(SYNONYMS)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{source}: unknown config key {key!r}{hint}")


def _canonical_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Map synonyms to their key; two spellings with different values is an error."""
    names = set(_field_names())
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ValueError(f"{source}: config keys must be strings, got {key!r}")
        canon = SYNONYMS.get(key, key)
        if canon not in names:
            raise _unknown(key, source)
        if canon in out and out[canon] != value:
            raise ValueError(
                f"{source}: {key!r} = {value!r} disagrees with {canon!r} = {out[canon]!r}; "
                "give one of them"
            )
        out[canon] = value
    return out


def _apply_override(values: dict[str, Any], key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    canon = SYNONYMS.get(head, head)
    if canon not in _field_names():
        raise _unknown(head, "override")
    if not rest:
        values[canon] = value
        return
    if canon not in ("model", "input_alphas", "target_alphas", "short_batch", "read_noise"):
        raise ValueError(f"override {key!r}: {canon!r} is not a mapping, use {canon}=VALUE")
    sub = dict(values.get(canon) or {})
    sub[rest] = value
    values[canon] = sub


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's type hint; convert the few safe cases."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if key in ("total_tokens", "warmup_tokens", "eval_interval", "checkpoint_interval"):
        return parse_tokens(key, value)
    bad = ValueError(f"config key {key!r}: expected {_type_name(hint)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise bad
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise bad
        try:
            return float(value)  # YAML reads "6e-4" (no dot) as a string
        except ValueError:
            raise bad from None
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise bad
        return tuple(_coerce(key, v, float) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return list(value)
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def parse_tokens(key: str, value: Any) -> float:
    """Millions of tokens from a number (millions) or a string with a suffix (exact)."""
    if isinstance(value, bool):
        raise ValueError(f"config key {key!r}: expected millions of tokens, got {value!r}")
    if isinstance(value, int | float):
        out = float(value)
    elif isinstance(value, str):
        text = value.strip().upper().replace("_", "").replace(",", "")
        suffix = text[-1] if text and text[-1] in _SUFFIX else ""
        try:
            out = float(text[: len(text) - len(suffix)]) * _SUFFIX[suffix] / 1e6
        except ValueError:
            raise ValueError(
                f"config key {key!r}: {value!r} is not a token count (millions, or e.g. '200K')"
            ) from None
    else:
        raise ValueError(f"config key {key!r}: expected millions of tokens, got {value!r}")
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"config key {key!r}: must be >= 0, got {value!r}")
    return out


def _split_tokens(cfg: TrainConfig) -> tuple[int, int]:
    n = cfg.num_tokens_per_sample
    i, t = cfg.num_input_tokens, cfg.num_target_tokens
    if i is None and t is None:
        i = n // 2
    if i is None:
        i = n - t
    if t is None:
        t = n - i
    return i, t


def _validate(cfg: TrainConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"config: {msg}")

    need(cfg.time_budget >= 0, f"time_budget must be >= 0 minutes, got {cfg.time_budget}")
    for name in ("batch_size", "num_tokens_per_sample", "grad_accum", "keep_checkpoints"):
        need(getattr(cfg, name) >= 1, f"{name} must be >= 1, got {getattr(cfg, name)}")
    need(cfg.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    need(cfg.total_tokens > 0, f"total_tokens must be > 0, got {cfg.total_tokens}")
    need(
        cfg.warmup_tokens <= cfg.total_tokens,
        f"warmup_tokens ({cfg.warmup_tokens}M) exceeds total_tokens ({cfg.total_tokens}M)",
    )
    need(
        cfg.lr > 0 and 0 <= cfg.min_lr <= cfg.lr,
        f"need 0 <= min_lr <= lr, got {cfg.min_lr}, {cfg.lr}",
    )
    need(cfg.weight_decay >= 0 and cfg.clip_grad >= 0, "weight_decay and clip_grad must be >= 0")
    i, t = _split_tokens(cfg)
    need(
        i >= 1 and t >= 1 and i + t == cfg.num_tokens_per_sample,
        f"num_input_tokens ({i}) + num_target_tokens ({t}) must equal "
        f"num_tokens_per_sample ({cfg.num_tokens_per_sample}), both >= 1",
    )
    need(cfg.num_workers >= 0 and cfg.log_interval >= 1, "num_workers >= 0, log_interval >= 1")
    need(cfg.eval_samples >= 1, f"eval_samples must be >= 1, got {cfg.eval_samples}")
    need(
        cfg.resume in ("auto", "none") or bool(cfg.resume),
        "resume must be auto, none or a checkpoint directory",
    )
    need(cfg.plan_devices is None or cfg.plan_devices >= 1, "plan_devices must be >= 1")
    need(cfg.stop_after_steps is None or cfg.stop_after_steps >= 1, "stop_after_steps >= 1")
    for name in ("input_alphas", "target_alphas", "read_noise"):
        for k, v in getattr(cfg, name).items():
            ok = isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
            need(ok, f"{name}.{k} must be a number >= 0, got {v!r}")
    need(cfg.motion_batch >= 0, f"motion_batch must be >= 0, got {cfg.motion_batch}")
    need(
        not cfg.motion_batch or bool(cfg.model.get("motion_dense")),
        "motion_batch trains the forecast's motion path: set model.motion_dense",
    )
    need(cfg.read_batch >= 0, f"read_batch must be >= 0, got {cfg.read_batch}")
    need(
        not cfg.read_batch or bool(cfg.model.get("read_heat")),
        "read_batch trains the skeleton's heat map: set model.read_heat",
    )
    masking_config(cfg)  # alphas name real modalities, mixtures are well formed
    short_batch(cfg)
