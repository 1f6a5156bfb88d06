"""The training config: the note's keys, synonyms, overrides, errors, the plan, the lr schedule."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from training.config import TrainConfig, config_from_dict, load_config
from training.plan import lr_at, make_plan

REPO = Path(__file__).resolve().parents[2]
NOTE_KEYS = """
batch_size: 128                # per-GPU (512 global)
total_tokens: 5000             # million
warmup_tokens: 500             # million
token_warmup: 500              # synonym in older Hydra
num_tokens_per_sample: 256     # 128 in + 128 out
lr: 0.0006
min_lr: 1e-6
weight_decay: 0.05
clip_grad: 1.0
dtype: fp32
"""


def test_the_notes_block_parses_as_written(tmp_path):
    path = tmp_path / "note.yaml"
    path.write_text(NOTE_KEYS)
    cfg = load_config(path)
    assert cfg.batch_size == 128 and cfg.total_tokens == 5000 and cfg.warmup_tokens == 500
    assert (cfg.input_tokens, cfg.target_tokens) == (128, 128)
    assert cfg.lr == 6e-4 and cfg.min_lr == 1e-6  # "1e-6" is a YAML string; still a float
    assert cfg.weight_decay == 0.05 and cfg.clip_grad == 1.0 and cfg.dtype == "fp32"


def test_m2_base_is_the_original_run_and_its_plan():
    cfg = load_config(REPO / "configs" / "m2-base.yaml")
    assert (cfg.batch_size, cfg.num_tokens_per_sample, cfg.lr, cfg.min_lr) == (128, 256, 6e-4, 1e-6)
    assert (cfg.weight_decay, cfg.clip_grad, cfg.dtype, cfg.plan_devices) == (0.05, 1.0, "fp32", 4)
    plan = make_plan(cfg, cfg.plan_devices)
    assert plan.global_batch == 512 and plan.tokens_per_step == 512 * 256
    assert plan.total_steps == 38_147 == math.ceil(5e9 / (512 * 256))
    assert plan.warmup_steps == 3_815
    assert "38,147 steps" in plan.describe(tokens_per_s=1e5)


def test_m2_tiny_loads():
    cfg = load_config(REPO / "configs" / "m2-tiny.yaml")
    assert cfg.model_preset == "tiny" and cfg.total_tokens > 0


def test_overrides_win_and_parse_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 8\nlr: 1e-3\n")
    cfg = load_config(path, ["batch_size=4", "lr=3e-4", "model.dim=64", "resume=none",
                             "target_alphas.captions=2", "total_tokens=200K", "warmup_tokens=0",
                             "betas=[0.9, 0.99]"])  # fmt: skip
    assert cfg.batch_size == 4 and cfg.lr == 3e-4 and cfg.model == {"dim": 64}
    assert cfg.resume == "none" and cfg.target_alphas == {"captions": 2}
    assert cfg.total_tokens == pytest.approx(0.2) and cfg.betas == (0.9, 0.99)


def test_num_tokens_split_given_apart():
    cfg = config_from_dict({"num_tokens_per_sample": 256, "num_input_tokens": 96})
    assert (cfg.input_tokens, cfg.target_tokens) == (96, 160)
    with pytest.raises(ValueError, match="must equal"):
        config_from_dict(
            {"num_tokens_per_sample": 256, "num_input_tokens": 96, "num_target_tokens": 96}
        )


def test_warmup_synonym_both_given_and_different_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("warmup_tokens: 500\ntoken_warmup: 400\n")
    with pytest.raises(ValueError, match=r"token_warmup.*disagrees"):
        load_config(path)
    assert config_from_dict({"token_warmup": 7}).warmup_tokens == 7
    # an override wins over the file whichever spelling each uses
    path.write_text("warmup_tokens: 500\n")
    assert load_config(path, ["token_warmup=300"]).warmup_tokens == 300


@pytest.mark.parametrize(
    ("text", "overrides", "match"),
    [
        ("batch_sise: 8\n", [], "unknown config key 'batch_sise'.*batch_size"),
        ("", ["learning_rate=1"], "unknown config key 'learning_rate'"),
        ("", ["dtype=fp8"], "dtype must be one of"),
        ("", ["batch_size=2.5"], "batch_size"),
        ("", ["warmup_tokens=6000"], "exceeds total_tokens"),
        ("", ["lr.x=1"], "not a mapping"),
        ("", ["novalue"], "not key=value"),
        ("- a\n- b\n", [], "expected a mapping"),
        ("", ["total_tokens=lots"], "not a token count"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, overrides, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(path, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_lr_schedule_boundaries():
    cfg = TrainConfig(total_tokens=100, warmup_tokens=10, lr=1e-3, min_lr=1e-5)
    assert lr_at(cfg, 0) == 0.0
    assert lr_at(cfg, 5e6) == pytest.approx(5e-4)  # half way through warmup
    assert lr_at(cfg, 10e6) == pytest.approx(1e-3)  # peak at the end of warmup
    assert lr_at(cfg, 55e6) == pytest.approx((1e-3 + 1e-5) / 2)  # cosine mid-point
    assert lr_at(cfg, 100e6) == pytest.approx(1e-5)  # min_lr at the end
    assert lr_at(cfg, 200e6) == pytest.approx(1e-5)  # and flat after
    values = [lr_at(cfg, t * 1e6) for t in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # monotone decay


def test_lr_schedule_without_warmup_starts_at_peak():
    cfg = TrainConfig(total_tokens=1, warmup_tokens=0, lr=1e-3, min_lr=0)
    assert lr_at(cfg, 0) == pytest.approx(1e-3)


def test_short_batch_takes_dotted_overrides_and_counts_in_the_plan():
    short = ("short_batch={batch_size: 32, input_tokens: 40, target_tokens: 128, "
             "alpha_mixtures: [{inputs: {coords: 1}, targets: {action: 1}}]}")  # fmt: skip
    path = REPO / "configs" / "m2-tiny-v2.yaml"
    cfg = load_config(path, [short, "short_batch.batch_size=8"])
    assert cfg.short_batch["batch_size"] == 8 and cfg.short_batch["input_tokens"] == 40
    assert make_plan(cfg, 1).tokens_per_step == 16 * 456 + 8 * (40 + 128)
    assert make_plan(load_config(path), 1).tokens_per_step == 16 * 456  # off in the config


def test_read_noise_is_given_by_joint_group_and_reaches_the_masking():
    from training.builders import masking_config

    path = REPO / "configs" / "m2-tiny-v2.yaml"
    cfg = load_config(
        path, ["read_noise={wrists: 0.1}", "read_noise.head=0.03", "read_noise_prob=0.5"]
    )
    m = masking_config(cfg)
    assert m.read_noise_prob == 0.5
    assert m.read_noise == (0.03, 0, 0, 0, 0, 0.1, 0.1, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match=r"unknown joint group.*'hands'"):
        load_config(path, ["read_noise.hands=0.1"])
    with pytest.raises(ValueError, match="needs read_noise"):
        load_config(path, ["read_noise_prob=0.5"])
    with pytest.raises(ValueError, match=r"read_noise\.wrists must be a number >= 0"):
        load_config(path, ["read_noise.wrists=true"])


def test_motion_batch_needs_the_motion_path():
    path = REPO / "configs" / "m2-tiny-v2.yaml"
    assert load_config(path, ["motion_batch=64"]).motion_batch == 64
    with pytest.raises(ValueError, match=r"set model\.motion_dense"):
        load_config(path, ["motion_batch=64", "model.motion_dense=false"])
    with pytest.raises(ValueError, match="motion_batch must be >= 0"):
        load_config(path, ["motion_batch=-1"])


def test_read_batch_needs_the_heat_map():
    path = REPO / "configs" / "m2-tiny-v2.yaml"
    assert load_config(path, ["read_batch=64", "model.read_heat=true"]).read_batch == 64
    with pytest.raises(ValueError, match=r"set model\.read_heat"):
        load_config(path, ["read_batch=64", "model.read_heat=false"])
    with pytest.raises(ValueError, match="read_batch must be >= 0"):
        load_config(path, ["read_batch=-1"])
