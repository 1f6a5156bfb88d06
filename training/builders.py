"""What a run builds from its training config: the model (its config and starting weights),
the optimizer's parameter groups, the masking of the main batch, and the short batch
(`training/config.py` reads and checks the values)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from m2core.model_v2 import M2ConfigV2
from training import train_state as ts

if TYPE_CHECKING:
    from training.config import TrainConfig

log = logging.getLogger("training.train")


def model_config(cfg: TrainConfig, meta: dict[str, Any]) -> Any:
    """The m2core.model.M2Config of this run: the preset plus `model` overrides, with the
    vocabularies of the prepared data (`meta.json`) and the run's slot counts."""
    if cfg.model.get("format") == 2:  # per-modality adapters (m2core/model_v2.py)
        from m2core.model_v2 import M2ConfigV2

        levels = json.loads((Path(cfg.data_dir) / "image_tokenizer" / "config.json").read_text())[
            "levels"
        ]
        return M2ConfigV2.from_preset(
            cfg.model_preset,
            **{"image_levels": tuple(levels), "text_vocab": meta["text_vocab"], "caption_len": meta["caption_len"],
               "action_classes": len(meta.get("actions") or ()) or 10, "input_tokens": cfg.input_tokens,
               "target_tokens": cfg.target_tokens, **cfg.model},
        )  # fmt: skip
    from m2core.model import M2Config

    return M2Config.from_preset(
        cfg.model_preset,
        **{"image_vocab": meta["image_vocab"], "text_vocab": meta["text_vocab"], "caption_len": meta["caption_len"],
           "input_tokens": cfg.input_tokens, "target_tokens": cfg.target_tokens, **cfg.model},
    )  # fmt: skip


def masking_config(cfg: TrainConfig) -> Any:
    """The m2core.masking.MaskingConfig of this run.

    `alpha_mixtures` (a list of {inputs, targets, weight}) replaces the default alpha sets;
    else `input_alphas` / `target_alphas`, when given, replace the inputs / targets of
    every default set; else masking's defaults (vision-heavy inputs, text-heavy targets).
    """
    from m2core.masking import DEFAULT_ALPHA_SETS, AlphaSet, MaskingConfig

    try:
        if cfg.alpha_mixtures:
            sets = tuple(AlphaSet(**dict(m)) for m in cfg.alpha_mixtures)
        else:
            sets = tuple(
                AlphaSet(
                    inputs=cfg.input_alphas or s.inputs,
                    targets=cfg.target_alphas or s.targets,
                    weight=s.weight,
                )
                for s in DEFAULT_ALPHA_SETS
            )
        return MaskingConfig(cfg.input_tokens, cfg.target_tokens, sets, cfg.reveal_prob,
                             read_noise(cfg.read_noise), cfg.read_noise_prob)  # fmt: skip
    except (TypeError, ValueError) as e:
        raise ValueError(f"config: masking: {e}") from None


def read_noise(groups: dict[str, float]) -> tuple[float, ...]:
    """{joint group: std} -> one std per joint (a group left out: 0); {} -> () (off)."""
    from m2core.modalities import JOINT_GROUPS, NUM_JOINTS

    bad = sorted(set(groups) - set(JOINT_GROUPS))
    if bad:
        raise ValueError(f"read_noise: unknown joint group(s) {bad}; known: {list(JOINT_GROUPS)}")
    if not groups:
        return ()
    sigma = [0.0] * NUM_JOINTS
    for name, joints in JOINT_GROUPS.items():
        for j in joints:
            sigma[j] = groups.get(name, 0.0)
    return tuple(sigma)


@dataclass(frozen=True)
class ShortBatch:
    """The run's second batch (`short_batch`): per-device samples, their masking, loss weight."""

    batch_size: int
    masking: Any  # m2core.masking.MaskingConfig
    weight: float

    @property
    def tokens_per_sample(self) -> int:
        return self.masking.input_budget + self.masking.target_budget


SHORT_KEYS = ("batch_size", "input_tokens", "target_tokens", "alpha_mixtures", "weight")


def short_batch(cfg: TrainConfig) -> ShortBatch | None:
    """The `short_batch` of this run, checked; None when it is off ({})."""
    from m2core.masking import AlphaSet, MaskingConfig

    spec = cfg.short_batch
    if not spec:
        return None
    unknown = sorted(set(spec) - set(SHORT_KEYS))
    if unknown:
        raise ValueError(
            f"config: short_batch: unknown key(s) {unknown}; known: {list(SHORT_KEYS)}"
        )
    missing = [k for k in SHORT_KEYS[:4] if k not in spec]
    if missing:
        raise ValueError(f"config: short_batch needs {missing}")
    for key in SHORT_KEYS[:3]:
        v = spec[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config: short_batch.{key} must be an integer >= 1, got {v!r}")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise ValueError(f"config: short_batch.weight must be a number > 0, got {weight!r}")
    mixtures = spec["alpha_mixtures"]
    if not isinstance(mixtures, list) or not mixtures:
        raise ValueError("config: short_batch.alpha_mixtures must be a non-empty list")
    try:
        sets = tuple(AlphaSet(**dict(m)) for m in mixtures)
        masking = MaskingConfig(spec["input_tokens"], spec["target_tokens"], sets, cfg.reveal_prob)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config: short_batch: {e}") from None
    return ShortBatch(spec["batch_size"], masking, float(weight))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only, not on norms, biases or embeddings; the
    parameters the model lists in `LR_SCALE` (name prefix -> factor) get their own groups
    whose learning rate is the schedule's times that factor (`lr_scale`)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    scales: dict[str, float] = getattr(model, "LR_SCALE", {})
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = next((f for pre, f in scales.items() if name.startswith(pre)), 1.0)
            decay = not (p.ndim < 2 or id(p) in embeddings)
            groups.setdefault((decay, scale), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        for (decay, scale), ps in groups.items()
        if ps or scale == 1.0
    ]


def build_model(cfg: TrainConfig, mcfg, train_shards, val_shards, fresh: bool) -> nn.Module:
    """The model with its starting weights; parts fitted outside the run are frozen."""
    from m2core.model import M2Model
    from m2core.model_v2 import M2ModelV2

    torch.manual_seed(cfg.seed)  # same initial weights on every process
    np.random.seed(cfg.seed)
    model = M2ModelV2(mcfg) if isinstance(mcfg, M2ConfigV2) else M2Model(mcfg)
    if cfg.init_from and fresh:
        new = ts.load_initial_weights(cfg.init_from, model)
        if ts.is_main():
            log.info("initial weights from %s%s", cfg.init_from,
                     f" (new, freshly initialised: {', '.join(new)})" if new else "")  # fmt: skip
    if cfg.context_warmup_steps and fresh:
        from training.pose_context import warm_start

        got = warm_start(model, train_shards, val_shards, cfg.context_warmup_steps, cfg.seed)
        if ts.is_main():
            log.info("pose context warm start: %d steps, training CE %.3f, names the action of "
                     "%.1f%% of validation skeletons", cfg.context_warmup_steps, got["train_ce"],
                     100 * got["val_accuracy"])  # fmt: skip
    # fitted after training by `m2 fit-*`: the transformer's losses train around them
    for part in ("image_context", "pose_reader", "motion"):
        if getattr(model, part, None) is not None:
            getattr(model, part).requires_grad_(False)
    return model
