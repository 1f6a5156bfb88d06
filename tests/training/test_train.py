"""train(): the tiny end-to-end run, exact resume, atomic checkpoints, optimizer groups, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training import train_state as ts
from training.builders import param_groups
from training.train import main, train

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "batch_size": 4, "num_tokens_per_sample": 64, "total_tokens": "1536", "warmup_tokens": "512",
    "model_preset": "tiny", "model": {"dim": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1},
    "eval_interval": "768", "eval_samples": 8, "checkpoint_interval": "512", "keep_checkpoints": 2,
    "num_workers": 0, "log_interval": 1, "cpu": True, "lr": 3e-3,
}  # fmt: skip


def _prepare(tmp: Path, tokenizer: Path, clips: int = 4) -> Path:
    from training.data.prepare import PrepareOptions, prepare
    from training.synth.synth import generate

    generate(tmp / "synth", clips=clips, seed=1, workers=1, frames=(20, 24), progress=False)
    prepare(PrepareOptions(tmp / "synth", tokenizer, tmp / "prep", workers=0, val_fraction=0.3))
    return tmp / "prep"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from m2core.tokenizers.image import ImageTokenizer, ImageTokenizerConfig

    tmp = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    tok = ImageTokenizer(ImageTokenizerConfig(levels=(4, 4), channels=(8, 8, 16, 16), res_blocks=0))
    return _prepare(tmp, tok.save_pretrained(tmp / "tok"))


@pytest.mark.slow
def test_end_to_end_synth_tokenizer_prepare_train_eval(tmp_path):
    from m2core.checkpoint import load_checkpoint
    from m2core.generate import GenerationConfig, generate
    from training.eval.evaluate import main as eval_main
    from training.synth.synth import generate as synth
    from training.tokenizer.train import main as tok_main

    synth(tmp_path / "synth", clips=3, seed=2, workers=1, frames=(20, 22), progress=False)
    assert tok_main(["--data", str(tmp_path / "synth"), "--out", str(tmp_path / "tok"), "steps=2",
                     "batch_size=2", "channels=[8,8,16,16]", "res_blocks=0", "levels=[4,4]",
                     "val_frames=2", "eval_frames=2", "max_train_frames=16"]) == 0  # fmt: skip
    from training.data.prepare import main as prep_main

    assert prep_main(["--data", str(tmp_path / "synth"), "--tokenizer", str(tmp_path / "tok"),
                      "--out", str(tmp_path / "prep"), "--workers", "0", "--val-fraction", "0.4"]) == 0  # fmt: skip
    res = train({**TINY, "data_dir": str(tmp_path / "prep"), "output_dir": str(tmp_path / "run")})
    assert res.final_dir == tmp_path / "run" / "final" and res.tokens >= 1536
    assert all(np.isfinite(res.losses)) and set(res.val) >= {"coords", "coords_next", "mean"}
    bundle = load_checkpoint(res.final_dir)  # m2core loads what training exported
    assert bundle.image_tokenizer is not None and bundle.text_tokenizer is not None
    card = (res.final_dir / "MODEL_CARD.md").read_text()
    assert "Validation cross-entropy" in card and "batch_size: 4" in card
    tok = np.load(tmp_path / "prep" / "val" / "tok_rgb.npy")[:1].astype(np.int64)
    out = generate(
        bundle.model, {"tok_rgb": torch.from_numpy(tok)}, GenerationConfig(maskgit_steps=1)
    )
    assert out.coords_next.shape == (1, 1, 234)
    # logs: per-modality training losses and validation CE, as CSV
    rows = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()
    keys = {r.split(",")[1] for r in rows[1:]}
    assert {"train/loss", "tokens_per_s", "val/ce_mean", "train/ce_coords_next"} <= keys
    assert eval_main(["--checkpoint", str(res.final_dir), "--data", str(tmp_path / "prep"),
                      "--out", str(tmp_path / "eval"), "--samples", "4", "--maskgit-steps", "1",
                      "--gifs", "2"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert len(report["coords_next"]["pck@0.05"]) == 6 and "zero_velocity" in report["coords_next"]
    assert (tmp_path / "eval" / "pose_future_predicted.gif").stat().st_size > 0


def test_resumed_run_gives_the_same_losses(prepared, tmp_path):
    cfg = {**TINY, "data_dir": str(prepared), "num_workers": 1}
    whole = train({**cfg, "output_dir": str(tmp_path / "a")})
    first = train({**cfg, "output_dir": str(tmp_path / "b"), "stop_after_steps": 3})
    assert first.final_dir is None and first.step == 3
    rest = train({**cfg, "output_dir": str(tmp_path / "b")})  # resume=auto
    assert len(whole.losses) == 6 and len(first.losses) + len(rest.losses) == 6
    assert first.losses + rest.losses == pytest.approx(whole.losses, rel=1e-6, abs=1e-6)
    assert rest.val == pytest.approx(whole.val, rel=1e-5)
    # checkpoints every 512 tokens (2 steps), only the newest 2 kept
    names = [p.name for p in ts.list_checkpoints(tmp_path / "b" / "checkpoints")]
    assert names == ["step-00000004", "step-00000006"]
    # the CSV reads as one run: no step logged twice
    steps = [
        json.loads(r)["step"]
        for r in (tmp_path / "b" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    train_steps = [s for s, r in zip(steps, (tmp_path / "b" / "logs" / "metrics.jsonl").read_text().splitlines(),
                                     strict=True) if "train/loss" in r]  # fmt: skip
    assert train_steps == list(range(1, 7))


def test_interrupted_checkpoint_write_is_ignored(prepared, tmp_path):
    """What `kill -9` during a save leaves (a .tmp dir, or a dir without state.json) is never
    taken for a checkpoint; the previous one loads and resume continues from it."""
    cfg = {**TINY, "data_dir": str(prepared), "output_dir": str(tmp_path / "r")}
    train({**cfg, "stop_after_steps": 2})
    root = tmp_path / "r" / "checkpoints"
    good = ts.latest_checkpoint(root)
    half = root / ".tmp-step-00000004-999"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    bare = root / "step-00000005"  # a renamed dir must have state.json to count
    bare.mkdir()
    assert ts.latest_checkpoint(root) == good
    res = train({**cfg, "stop_after_steps": 4})
    assert res.step == 4 and not half.exists()
    assert ts.latest_checkpoint(root).name == "step-00000004"


def test_weight_decay_skips_norms_biases_and_embeddings():
    from m2core.model import M2Config, M2Model

    model = M2Model(M2Config.from_preset("tiny", dim=32, heads=2, enc_layers=1, dec_layers=1))
    decay, rest = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    no_decay = {names[id(p)] for p in rest["params"]}
    assert {"tok_emb.weight", "mod_emb.weight", "mask_token", "enc_norm.weight"} <= no_decay
    assert all(p.ndim == 2 and "emb" not in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert decay["lr_scale"] == rest["lr_scale"] == 1.0
    ctx = M2Model(M2Config.from_preset("tiny", dim=32, heads=2, enc_layers=1, dec_layers=1,
                                       pose_context=True, action_classes=4))  # fmt: skip
    groups = param_groups(ctx, 0.05)
    fast = {names for g in groups if g["lr_scale"] == 10.0 for names in map(id, g["params"])}
    named = dict(ctx.named_parameters())
    assert fast == {id(p) for n, p in named.items() if n.startswith(tuple(ctx.LR_SCALE))}
    assert set(ctx.LR_SCALE) == {"pose_context.2.", "caption_context."}
    assert {g["weight_decay"] for g in groups if g["lr_scale"] == 10.0} == {0.05, 0.0}
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip().startswith("m2 train: error: config file")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'nothing'}\noutput_dir: {tmp_path / 'o'}\ncpu: true\n")
    assert main(["--config", str(cfg)]) == 2
    assert "run `m2 prepare` first" in capsys.readouterr().err
    assert main(["--config", str(cfg), "bogus_key=1"]) == 2
    assert "unknown config key 'bogus_key'" in capsys.readouterr().err


def test_script_prints_the_plan_of_m2_base(tmp_path):
    """`train.py --config configs/m2-base.yaml` states the original run's plan on start."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "training" / "train.py"),
            "--config",
            str(REPO / "configs" / "m2-base.yaml"),
            f"data_dir={tmp_path}",
            "cpu=true",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2  # no prepared data there, after printing the plan
    assert "38,147 steps (3,815 warmup)" in proc.stderr and "131,072 tokens/step" in proc.stderr


def test_time_budget_cuts_the_run_and_still_exports(prepared, tmp_path):
    """10M tokens would take minutes; a 0.25-minute budget re-plans the run after a short
    calibration, decays the lr to min_lr by the new end and exports as usual."""
    import time

    t0 = time.perf_counter()
    cfg = {**TINY, "data_dir": str(prepared), "output_dir": str(tmp_path / "t"),
           "total_tokens": 10, "warmup_tokens": "2K", "eval_interval": 0, "checkpoint_interval": 0,
           "time_budget": 0.25, "log_interval": 5}  # fmt: skip
    res = train(cfg)
    took = time.perf_counter() - t0
    assert res.final_dir is not None and (res.final_dir / "model.safetensors").is_file()
    assert 5 < res.step < 10_000_000 // (4 * 64) and took < 60
    state = json.loads(
        (ts.latest_checkpoint(tmp_path / "t" / "checkpoints") / ts.STATE_FILE).read_text()
    )
    assert state["fitted"]["total_steps"] == res.step
    assert state["config"]["total_tokens"] == pytest.approx(res.step * 4 * 64 / 1e6)
    rows = [
        json.loads(r) for r in (tmp_path / "t" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[-1] == pytest.approx(1e-6) and max(lrs) > 1e-3  # warmed up, then decayed to min_lr


def test_time_budget_says_when_total_tokens_caps_the_run():
    """total_tokens is an upper bound under time_budget: when the time would fit well over
    the token count's steps, the run says that raising total_tokens would use it."""
    from training.config import make_config
    from training.plan import cap_note, make_plan, steps_in_time

    cfg = make_config({**TINY, "data_dir": "x", "total_tokens": "40K"})
    plan = make_plan(cfg, 1)  # 256 tokens per step -> 157 steps
    fits = steps_in_time(plan, step=10, steps_per_s=10.0, seconds_left=60)
    assert fits == 610
    note = cap_note(cfg, plan, fits)
    assert note is not None and "caps this run at 157 steps" in note and "about 610" in note
    assert cap_note(cfg, plan, 160) is None  # within 5%: nothing to say


def test_time_budget_refit_cuts_a_run_whose_machine_slowed():
    """After calibration the run re-measures its speed: at half the speed it planned for,
    the steps that still fit in the time left are what it keeps; when the plan still fits,
    nothing changes (it never stretches)."""
    from accelerate import Accelerator

    from training.config import make_config
    from training.plan import make_plan, refit_budget

    acc = Accelerator(cpu=True)
    cfg = make_config({**TINY, "data_dir": "x", "total_tokens": "40K", "time_budget": 1,
                       "eval_interval": 0})  # fmt: skip
    plan = make_plan(cfg, 1)  # 157 steps; 60 s budget, 4.8 s kept for the end
    fitted = {"total_steps": 157, "steps_per_s": 4.0}
    # at step 40, 25 s in: 30.2 s left at 2 steps/s -> 60 more steps
    cut = refit_budget(acc, cfg, plan, 40, 2.0, t_start=0.0, eval_s=0.0, fitted=fitted, now=25.0)
    assert cut is not None
    new_cfg, record = cut
    assert make_plan(new_cfg, 1).total_steps == 100 == record["total_steps"]
    assert record["steps_per_s"] == 2.0
    assert refit_budget(acc, cfg, plan, 40, 10.0, 0.0, 0.0, fitted, now=25.0) is None


def test_fit_to_time_never_raises_the_total_and_shrinks_warmup():
    from training.config import make_config
    from training.plan import make_plan, steps_in_time, with_total_steps

    def fit_to_time(cfg, plan, step, steps_per_s, seconds_left):
        return with_total_steps(cfg, plan, steps_in_time(plan, step, steps_per_s, seconds_left))

    cfg = make_config({**TINY, "data_dir": "x", "total_tokens": 1, "warmup_tokens": "100K"})
    plan = make_plan(cfg, 1)  # 256 tokens per step
    short = fit_to_time(cfg, plan, step=10, steps_per_s=2.0, seconds_left=20)
    assert make_plan(short, 1).total_steps == 50
    assert short.warmup_tokens == pytest.approx(50 * 256 / 1e6 / 10)  # a tenth of the new total
    assert fit_to_time(cfg, plan, 10, 1e6, 1e6).total_tokens == cfg.total_tokens  # never raised
    assert make_plan(fit_to_time(cfg, plan, 10, 2.0, -5), 1).total_steps == 11  # at least one more


def test_export_false_then_m2_export_gives_the_same_serving_model(prepared, tmp_path, capsys):
    """A run with export=false leaves only training checkpoints; `m2 export --from` turns
    the last one (here stored in fp16, as a GPU box may send it back) into a serving
    checkpoint that loads and predicts like the model it came from."""
    from safetensors.torch import load_file, save_file

    from m2core.checkpoint import load_checkpoint
    from training.export import main as export_main

    cfg = {**TINY, "data_dir": str(prepared), "output_dir": str(tmp_path / "e"), "export": False}
    res = train(cfg)
    assert res.finished and res.final_dir is None and not (tmp_path / "e" / "final").exists()
    last = ts.latest_checkpoint(tmp_path / "e" / "checkpoints")
    half = tmp_path / "half"
    half.mkdir()
    (half / ts.STATE_FILE).write_text((last / ts.STATE_FILE).read_text())
    weights = load_file(str(last / "model.safetensors"))
    save_file({k: v.half() for k, v in weights.items()}, str(half / "model.safetensors"))
    assert export_main(["--from", str(half), "--out", str(tmp_path / "served")]) == 0
    bundle = load_checkpoint(tmp_path / "served")
    got = bundle.model.state_dict()
    for k, v in weights.items():
        assert torch.allclose(got[k], v.half().float()), k
    assert "Validation cross-entropy" in (tmp_path / "served" / "MODEL_CARD.md").read_text()
    assert export_main(["--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


def test_init_from_starts_a_run_from_another_runs_weights(prepared, tmp_path):
    """init_from: a fine-tune starts from a serving checkpoint's weights (fresh optimizer
    and schedule). With a vanishing lr it ends where it started; a model that grew a head
    since keeps that head's init; a checkpoint of another shape is a clear error."""
    from m2core.checkpoint import load_checkpoint
    from m2core.model import M2Model

    first = train({**TINY, "data_dir": str(prepared), "output_dir": str(tmp_path / "a")})
    cfg = {**TINY, "data_dir": str(prepared), "output_dir": str(tmp_path / "b"),
           "init_from": str(first.final_dir), "lr": 1e-9, "min_lr": 1e-10, "total_tokens": "512"}  # fmt: skip
    second = train(cfg)
    a = load_checkpoint(first.final_dir).model.state_dict()
    b = load_checkpoint(second.final_dir).model.state_dict()
    assert second.step == 2 and a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    grown = M2Model(load_checkpoint(first.final_dir).model.config.__class__.from_dict(
        {**json.loads((first.final_dir / "config.json").read_text())["model"], "pose_shift": True, "pose_basis": True}))  # fmt: skip
    fresh = ts.load_initial_weights(first.final_dir, grown)
    assert fresh == ["shift_heads.coords_next.bias", "shift_heads.coords_next.weight"]
    with pytest.raises(ts.TrainStateError, match=r"no model\.safetensors"):
        ts.load_initial_weights(tmp_path, grown)
    wide = {**TINY["model"], "dim": 48, "heads": 2}
    with pytest.raises(ValueError, match=r"init_from=.*is \("):
        train({**cfg, "output_dir": str(tmp_path / "c"), "model": wide})


def test_m2_export_best_picks_the_checkpoint_with_the_lowest_validation_metric(
    prepared, tmp_path, capsys
):
    """--best METRIC: early stopping after the fact, among the checkpoints the run kept."""
    from training.export import best_checkpoint
    from training.export import main as export_main

    cfg = {
        **TINY,
        "data_dir": str(prepared),
        "output_dir": str(tmp_path / "r"),
        "checkpoint_interval": "768",
    }
    train(cfg)
    rows = [
        json.loads(r) for r in (tmp_path / "r" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    val = {r["step"]: r["val/ce_mean"] for r in rows if "val/ce_mean" in r}
    assert sorted(val) == [3, 6]
    best = min(val, key=val.get)
    path, value = best_checkpoint(tmp_path / "r", "val/ce_mean")
    assert path.name == ts.checkpoint_name(best) and value == pytest.approx(val[best])
    assert (
        export_main(
            ["--from", str(tmp_path / "r"), "--best", "val/ce_mean", "--out", str(tmp_path / "s")]
        )
        == 0
    )
    assert ts.checkpoint_name(best) in capsys.readouterr().out
    assert (tmp_path / "s" / "model.safetensors").is_file()
    assert (
        export_main(
            ["--from", str(tmp_path / "r"), "--best", "val/nope", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "no kept checkpoint has 'val/nope'" in capsys.readouterr().err


def test_pose_context_warm_start_and_action_head_in_a_run(prepared, tmp_path):
    """context_warmup_steps fits the pose context's hidden layer and action head alone (the
    rest of the model, and the context's zero output layer, untouched); a run with the
    action head logs its CE; too few action_classes for the data is a clear error."""
    from m2core.model import M2Config, M2Model
    from training.data.shards import Shards, load_meta
    from training.pose_context import warm_start

    meta = load_meta(prepared)
    n_actions = len(meta["actions"])
    small = {"dim": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1}
    mc = M2Config.from_preset("tiny", **small, image_vocab=meta["image_vocab"],
                              text_vocab=meta["text_vocab"], caption_len=meta["caption_len"],
                              pose_context=True, action_classes=n_actions)  # fmt: skip
    torch.manual_seed(0)
    model = M2Model(mc)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = warm_start(model, Shards(prepared, "train"), Shards(prepared, "val"), 300)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"pose_context.0.weight", "pose_context.0.bias", "action_head.weight",
                       "action_head.bias"}  # fmt: skip
    assert got["train_ce"] < 0.5 * np.log(n_actions) and 0 <= got["val_accuracy"] <= 1
    with pytest.raises(ValueError, match=r"needs model\.pose_context"):
        warm_start(
            M2Model(M2Config.from_preset("tiny", **small)), Shards(prepared, "train"), None, 1
        )

    cfg = {**TINY, "data_dir": str(prepared), "output_dir": str(tmp_path / "a"), "total_tokens": "768",
           "model": {**small, "pose_context": True, "action_classes": n_actions}, "context_warmup_steps": 20}  # fmt: skip
    train(cfg)
    rows = [
        json.loads(r) for r in (tmp_path / "a" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("train/ce_action" in r for r in rows) and any("val/ce_action" in r for r in rows)
    with pytest.raises(ValueError, match=f"action_classes=1 but .* has {n_actions} actions"):
        train(
            {
                **cfg,
                "output_dir": str(tmp_path / "b"),
                "model": {**cfg["model"], "action_classes": 1},
            }
        )


def _fit_changes_only(model, part: str, fit_part):
    """Run `fit_part()` -> its figures; only `part.*` weights may change, and some must."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = fit_part()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(part + ".") for k in changed)
    return got


def _refit_cli(prepared, tmp_path, plain, fit_main, name: str, steps: int):
    """Save `plain` as a serving checkpoint and run an `m2 fit-*` main on it -> (the plain
    model as stored, the fitted bundle, its folder, the input folder); the output's
    transformer weights must be the input's."""
    from m2core.checkpoint import load_checkpoint, save_checkpoint
    from m2core.tokenizers.image import ImageTokenizer
    from m2core.tokenizers.text import TextTokenizer

    tok = ImageTokenizer.from_pretrained(prepared / "image_tokenizer")
    ck = save_checkpoint(tmp_path / "ck", plain, tok, TextTokenizer.load(prepared))
    plain = load_checkpoint(ck).model  # the stored weights, as the CLI reads them
    out = tmp_path / name
    assert (
        fit_main([str(ck), "--data", str(prepared), "--out", str(out), "--steps", str(steps)]) == 0
    )
    fitted = load_checkpoint(out)
    new = fitted.model.state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(new[k], v), k
    return plain, fitted, out, ck


def test_image_context_fit_and_cli(prepared, tmp_path, capsys):
    """The image context's warm start changes only its own weights and learns the training
    actions; `m2 fit-image-context` writes a checkpoint whose transformer weights are the
    input's, whose config has the context, and which generation uses; bad input is exit 2."""
    from m2core.checkpoint import save_checkpoint
    from m2core.generate import GenerationConfig, generate
    from m2core.model import M2Config, M2Model
    from training.data.shards import Shards, load_meta
    from training.image_context import fit
    from training.image_context import main as fit_main
    from training.pose_context import warm_start as pose_warm_start

    meta = load_meta(prepared)
    n_actions = len(meta["actions"])
    small = {"dim": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1}
    base = dict(**small, image_vocab=meta["image_vocab"], text_vocab=meta["text_vocab"],
                caption_len=meta["caption_len"], pose_context=True, action_classes=n_actions)  # fmt: skip
    torch.manual_seed(0)
    model = M2Model(M2Config.from_preset("tiny", **base, image_context_levels=4))
    train = Shards(prepared, "train")
    pose_warm_start(model, train, None, 300)  # an action head that reads the pose context
    got = _fit_changes_only(
        model,
        "image_context",
        lambda: fit(model, train, Shards(prepared, "val"), 300, progress=False),
    )
    assert got["train_ce"] < 0.75 * np.log(n_actions) and 0 <= got["val_accuracy"] <= 1
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match=r"needs model\.image_context_levels"):
        fit(M2Model(M2Config.from_preset("tiny", **base)), train, None, 1)

    plain = M2Model(M2Config.from_preset("tiny", **base)).eval()
    torch.nn.init.normal_(plain.caption_context.weight, std=0.5)  # as if trained: not zero
    plain, fitted, out, ck = _refit_cli(prepared, tmp_path, plain, fit_main, "ck-img", 20)
    tok = fitted.image_tokenizer
    assert fitted.model.config.image_context_levels == 4
    assert fitted.config["extra"]["image_context"]["steps"] == 20
    # generation gives the context's vector to the captions only where it read the skeleton
    shards = Shards(prepared, "val")
    rgb = torch.from_numpy(np.asarray(shards.arrays["tok_rgb"][:4], np.int64))
    coords = torch.from_numpy(np.asarray(shards.arrays["coords"][:4], np.int64))
    with torch.no_grad():
        assert fitted.model.image_hidden(rgb, coords).abs().sum() > 0
    cfg = GenerationConfig(temperature=0.0, maskgit_steps=2)
    off = GenerationConfig(temperature=0.0, maskgit_steps=2, caption_from_image=False)
    given = {"tok_rgb": rgb, "coords": coords}
    assert generate(fitted.model, given, cfg).captions == generate(plain, given, cfg).captions
    assert (
        generate(fitted.model, {"tok_rgb": rgb}, off).captions
        == generate(plain, {"tok_rgb": rgb}, cfg).captions
    )
    # a batch that mixes given and guessed skeletons (the service batches requests)
    mixed = coords.clone()
    mixed[2:] = -1
    got = generate(fitted.model, {"tok_rgb": rgb, "coords": mixed}, cfg).captions
    alone = generate(fitted.model, {"tok_rgb": rgb}, cfg).captions
    assert got[:2] == generate(plain, given, cfg).captions[:2] and got[2:] == alone[2:]

    assert fit_main([str(ck), "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    ck2 = save_checkpoint(tmp_path / "ck2", M2Model(M2Config.from_preset("tiny", **{**base, "pose_context": False, "action_classes": 0})), tok)  # fmt: skip
    assert fit_main([str(ck2), "--data", str(prepared), "--out", str(tmp_path / "o2")]) == 2
    assert "no action head" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fit_main([str(ck), "--data", str(prepared), "--out", str(ck)])


def test_motion_fit_and_cli(prepared, tmp_path, capsys):
    """The motion head's fit changes only its own weights and forecasts the training
    skeletons' motion better than standing still; `m2 fit-motion` writes a checkpoint whose
    transformer weights are the input's and whose forecast generation moves with it, while
    the present skeleton and caption stay as they were; bad input is exit 2."""
    from m2core.checkpoint import save_checkpoint
    from m2core.generate import GenerationConfig, generate
    from m2core.model import M2Config, M2Model, skeleton_features
    from training.data.shards import Shards, load_meta
    from training.motion import _batch, _distance, fit
    from training.motion import main as fit_main

    meta = load_meta(prepared)
    small = {"dim": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1}
    base = dict(**small, image_vocab=meta["image_vocab"], text_vocab=meta["text_vocab"],
                caption_len=meta["caption_len"])  # fmt: skip
    torch.manual_seed(0)
    model = M2Model(M2Config.from_preset("tiny", **base, motion_width=64))
    train = Shards(prepared, "train")
    rows = np.arange(len(train))
    feats, move, seen = _batch(train, rows, torch.device("cpu"))
    still = float(((move.pow(2).sum(-1) + 1e-8).sqrt() * seen).sum() / seen.sum())
    got = _fit_changes_only(
        model, "motion", lambda: fit(model, train, Shards(prepared, "val"), 400, progress=False)
    )
    with torch.no_grad():
        assert float(_distance(model.motion, feats, move, seen)) < 0.8 * still
    assert got["val_distance"] > 0 and got["val_zero_velocity"] > 0
    with pytest.raises(ValueError, match=r"needs model\.motion_width"):
        fit(M2Model(M2Config.from_preset("tiny", **base)), train, None, 1)
    with pytest.raises(ValueError, match="needs a pose reader"):
        fit(model, train, None, 1, read_share=0.5)

    # With a pose reader, batches forecast from the skeleton it reads from the frame. This
    # one is untrained, so its skeletons are far off: a head fitted on them learns to
    # forecast from them, one fitted on true skeletons does not.
    torch.manual_seed(0)
    both = M2Model(M2Config.from_preset("tiny", **base, motion_width=64, pose_reader_levels=4))
    start = {k: v.clone() for k, v in both.state_dict().items()}
    read = _batch(train, rows, torch.device("cpu"), both)
    with torch.no_grad():  # the read skeleton's features are those of read_pose's ids
        now = torch.from_numpy(np.asarray(train.arrays["coords"][rows], np.int64))
        rgb = torch.from_numpy(np.asarray(train.arrays["tok_rgb"][rows], np.int64))
        ids = both.read_pose(rgb, now)
        want = skeleton_features(ids, torch.arange(39).expand_as(ids), ids >= 0)
    assert torch.equal(read[0], want) and not torch.equal(read[0], feats)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fit(both, train, None, 1, read_share=1.5)
    far = {}
    for share in (0.0, 1.0):
        both.load_state_dict(start)
        got = _fit_changes_only(both, "motion", lambda s=share: fit(both, train, Shards(prepared, "val"), 300, read_share=s, progress=False))  # fmt: skip
        assert got["read_share"] == share and got["val_read_zero_velocity"] > 0
        with torch.no_grad():
            far[share] = float(_distance(both.motion, *read))
    still_read = float(((read[1].pow(2).sum(-1) + 1e-8).sqrt() * read[2]).sum() / read[2].sum())
    assert far[1.0] < 0.8 * still_read and far[1.0] < 0.8 * far[0.0]
    assert fit(both, train, None, 1, progress=False)["read_share"] == 0.5  # the default

    plain = M2Model(M2Config.from_preset("tiny", **base)).eval()
    plain, fitted, out, ck = _refit_cli(prepared, tmp_path, plain, fit_main, "ck-motion", 30)
    tok = fitted.image_tokenizer
    assert fitted.model.config.motion_width > 0
    assert fitted.config["extra"]["motion"]["steps"] == 30
    assert fitted.config["extra"]["motion"]["read_share"] == 0.0  # no pose reader
    shards = Shards(prepared, "val")
    rgb = torch.from_numpy(np.asarray(shards.arrays["tok_rgb"][:4], np.int64))
    coords = torch.from_numpy(np.asarray(shards.arrays["coords"][:4], np.int64))
    cfg = GenerationConfig(temperature=0.0, maskgit_steps=2)
    a = generate(fitted.model, {"tok_rgb": rgb, "coords": coords}, cfg)
    b = generate(plain, {"tok_rgb": rgb, "coords": coords}, cfg)
    assert a.captions == b.captions and torch.equal(a.coords, b.coords)
    assert not torch.equal(a.coords_next, b.coords_next)

    assert fit_main([str(ck), "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    no_prior = M2Model(M2Config.from_preset("tiny", **base, present_prior=False))
    ck2 = save_checkpoint(tmp_path / "ck2", no_prior, tok)
    assert fit_main([str(ck2), "--data", str(prepared), "--out", str(tmp_path / "o2")]) == 2
    assert "present prior" in capsys.readouterr().err
    args = [str(out), "--data", str(prepared), "--out", str(tmp_path / "o3"), "--read-share"]
    assert fit_main([*args, "0.5"]) == 2
    assert "needs a pose reader" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fit_main([str(ck), "--data", str(prepared), "--out", str(ck)])


def test_pose_reader_fit_and_cli(prepared, tmp_path, capsys):
    """The pose reader's fit changes only its own weights and learns where the training
    figures' joints are; `m2 fit-pose-reader` writes a checkpoint whose transformer weights
    are the input's; generation takes the reader's positions (and the transformer's flags)
    for a skeleton read from the frame and leaves a given one alone; bad input is exit 2."""
    from m2core.checkpoint import load_checkpoint
    from m2core.generate import GenerationConfig, generate
    from m2core.model import M2Config, M2Model
    from training.data.shards import Shards, load_meta
    from training.pose_reader import _batch, fit
    from training.pose_reader import main as fit_main

    meta = load_meta(prepared)
    small = {"dim": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1}
    base = dict(**small, image_vocab=meta["image_vocab"], text_vocab=meta["text_vocab"],
                caption_len=meta["caption_len"])  # fmt: skip
    torch.manual_seed(0)
    model = M2Model(M2Config.from_preset("tiny", **base, pose_reader_levels=4, pose_reader_flags=True))  # fmt: skip
    train = Shards(prepared, "train")
    rgb, xy, seen, flag = _batch(train.arrays, np.arange(len(train)), torch.device("cpu"))

    def l1_and_bce() -> tuple[float, float]:
        with torch.no_grad():
            got, visible = model.pose_reader.read(rgb)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(visible, flag.float())
            return float(((got - xy).abs().sum(-1) * seen).sum() / seen.sum()), float(bce)

    before_l1, before_bce = l1_and_bce()
    got = _fit_changes_only(
        model,
        "pose_reader",
        lambda: fit(model, train, Shards(prepared, "val"), 300, progress=False),
    )
    after_l1, after_bce = l1_and_bce()
    assert after_l1 < 0.6 * before_l1 and after_bce < 0.8 * before_bce
    assert 0 <= got["val_pck@0.05"] <= 1 and 0 <= got["val_flag_accuracy"] <= 1
    assert got["val_flag_all_visible"] == pytest.approx(
        float((np.asarray(Shards(prepared, "val").arrays["coords"])[:, 2::3] == 8193).mean())
    )
    with pytest.raises(ValueError, match="flag weight and shift"):
        fit(model, train, None, 1, flag_weight=-1.0)
    with pytest.raises(ValueError, match="flag weight and shift"):
        fit(model, train, None, 1, shift=-1)
    with pytest.raises(ValueError, match=r"needs model\.pose_reader_levels"):
        fit(M2Model(M2Config.from_preset("tiny", **base)), train, None, 1)

    plain = M2Model(M2Config.from_preset("tiny", **base)).eval()
    plain, fitted, out, ck = _refit_cli(prepared, tmp_path, plain, fit_main, "ck-reader", 20)
    assert fitted.model.config.pose_reader_levels == 4 and fitted.model.config.pose_reader_flags
    assert fitted.config["extra"]["pose_reader"]["steps"] == 20
    assert fitted.config["extra"]["pose_reader"]["shift"] == 2  # the options are recorded
    again = tmp_path / "ck-reader2"  # a second pass keeps the first's record
    assert fit_main([str(out), "--data", str(prepared), "--out", str(again), "--steps", "5", "--seed", "1"]) == 0  # fmt: skip
    record = load_checkpoint(again).config["extra"]["pose_reader"]
    assert record["steps"] == 5 and [r["steps"] for r in record["earlier"]] == [20]
    shards = Shards(prepared, "val")
    rgb = torch.from_numpy(np.asarray(shards.arrays["tok_rgb"][:4], np.int64))
    coords = torch.from_numpy(np.asarray(shards.arrays["coords"][:4], np.int64))
    cfg = GenerationConfig(temperature=0.0, maskgit_steps=2)
    given = {"tok_rgb": rgb, "coords": coords}
    assert torch.equal(generate(fitted.model, given, cfg).coords, coords)
    read = generate(fitted.model, {"tok_rgb": rgb}, cfg).coords.view(-1, 13, 3)
    with torch.no_grad():
        got, visible = fitted.model.pose_reader.read(rgb)
    assert torch.equal(read[..., :2], (got * 8192).floor().long())
    assert torch.equal(read[..., 2], torch.where(visible > 0, 8193, 8192))
    # a reader fitted before the flag head existed gets one, and its record is kept
    from m2core.checkpoint import save_checkpoint

    old = M2Model(M2Config.from_preset("tiny", **base, pose_reader_levels=4))
    ck_old = save_checkpoint(tmp_path / "ck-old", old, fitted.image_tokenizer,
                             extra={"pose_reader": {"steps": 7}})  # fmt: skip
    grown = tmp_path / "ck-grown"
    assert fit_main([str(ck_old), "--data", str(prepared), "--out", str(grown), "--steps", "3"]) == 0  # fmt: skip
    new = load_checkpoint(grown)
    assert new.model.config.pose_reader_flags
    assert new.config["extra"]["pose_reader"]["earlier"] == [{"steps": 7}]

    assert fit_main([str(ck), "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fit_main([str(ck), "--data", str(prepared), "--out", str(ck)])


def test_next_frame_fit_and_cli(prepared, tmp_path, capsys):
    """The next-frame head's fit changes only its own weights (and margin), lowers the
    cross-entropy of the next key frame's digits, and reports validation figures that
    `predict` reproduces: copying everything unless a margin beats copying; `m2
    fit-next-frame` writes a checkpoint whose transformer weights are the input's and whose
    generation takes the head's next key frame from the skeleton now and at t+6; bad input
    is refused."""
    from m2core.checkpoint import load_checkpoint
    from m2core.generate import GenerationConfig, generate
    from m2core.model import M2Config, M2Model, pose_points
    from training.data.shards import Shards, load_meta
    from training.next_frame import MARGINS, _inputs, fit, forecast
    from training.next_frame import main as fit_main

    meta = load_meta(prepared)
    small = {"dim": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1}
    base = dict(**small, image_vocab=meta["image_vocab"], text_vocab=meta["text_vocab"],
                caption_len=meta["caption_len"])  # fmt: skip
    torch.manual_seed(0)
    reader = {"pose_reader_levels": 4, "pose_reader_flags": True}
    model = M2Model(
        M2Config.from_preset("tiny", **base, next_frame_levels=4, motion_width=32, **reader)
    )
    train, val = Shards(prepared, "train"), Shards(prepared, "val")
    rows = np.arange(len(train))
    *given, nxt = _inputs(model, train.arrays, rows, torch.device("cpu"))

    def ce() -> float:
        with torch.no_grad():
            lp = model.next_frame.log_probs(*given)
            return float(-lp.gather(2, model.next_frame.digits_of(nxt)[:, :, None]).mean())

    before = ce()
    got = _fit_changes_only(
        model, "next_frame", lambda: fit(model, train, val, 300, progress=False)
    )
    assert ce() < 0.8 * before
    assert got["read_share"] == 0.5  # the default with a pose reader
    head = model.next_frame
    for key, read in (("val", False), ("val_read", True)):  # a margin each, picked alone
        margin = "margin_read" if read else "margin"
        rgb_v, *joints_v, nxt_v = _inputs(model, val.arrays, np.arange(len(val)), torch.device("cpu"), read)  # fmt: skip
        copy = float((rgb_v == nxt_v).float().mean())
        assert got[f"{key}_copy_accuracy"] == pytest.approx(copy)
        with torch.no_grad():
            pred = head.predict(rgb_v, *joints_v, getattr(head, margin))
        assert got[f"{key}_token_accuracy"] == pytest.approx(float((pred == nxt_v).float().mean()))
        assert got[f"{key}_changed"] == pytest.approx(float((pred != rgb_v).float().mean()))
        if got[margin] is None:  # no margin beat copying: the head copies the frame
            assert torch.equal(pred, rgb_v) and float(getattr(head, margin)) == float("inf")
        else:
            assert got[margin] in MARGINS and got[f"{key}_token_accuracy"] > copy
        assert 0 <= got[f"{key}_best_digits_accuracy"] <= 1
    got = fit(model, train, val, 1, margin=0.5, read_share=0.0, progress=False)
    assert got["margin"] == got["margin_read"] == 0.5 and got["read_share"] == 0
    assert float(head.margin) == float(head.margin_read) == 0.5
    # the forecast skeleton is the motion head's t+6, flags kept; the present without one
    coords = torch.from_numpy(np.asarray(train.arrays["coords"][:4], np.int64))
    later = forecast(model, coords).view(4, 13, 3)
    assert torch.equal(later[..., 2], coords.view(4, 13, 3)[..., 2])
    with torch.no_grad():
        move = model.motion_bins(coords, torch.arange(39).expand(4, 39), torch.ones_like(coords, dtype=torch.bool))  # fmt: skip
    step = move.view(4, 6, 13, 3)[:, -1, :, :2].round().long()
    placed = (coords.view(4, 13, 3)[..., :2] < 8192).all(-1)
    assert torch.equal(later[..., :2][placed], (coords.view(4, 13, 3)[..., :2] + step).clamp(0, 8191)[placed])  # fmt: skip
    plain_model = M2Model(M2Config.from_preset("tiny", **base))
    assert torch.equal(forecast(plain_model, coords), coords)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        fit(model, train, None, 1, margin=-1.0)
    with pytest.raises(ValueError, match=r"read share must be in \[0, 1\]"):
        fit(model, train, None, 1, read_share=1.5)
    no_reader = M2Model(M2Config.from_preset("tiny", **base, next_frame_levels=4))
    with pytest.raises(ValueError, match="needs a pose reader"):
        fit(no_reader, train, None, 1, read_share=0.5)
    assert "margin_read" not in fit(no_reader, train, val, 1, progress=False)
    with pytest.raises(ValueError, match=r"needs model\.next_frame_levels"):
        fit(plain_model, train, None, 1)

    plain = M2Model(M2Config.from_preset("tiny", **base, motion_width=32, **reader)).eval()
    plain, fitted, out, ck = _refit_cli(prepared, tmp_path, plain, fit_main, "ck-next", 30)
    assert fitted.model.config.next_frame_levels == 4
    record = fitted.config["extra"]["next_frame"]
    assert record["steps"] == 30 and "margin" in record
    # generation: the head's frame from the frame, the skeleton now and the forecast's t+6
    shards = Shards(prepared, "val")
    rgb = torch.from_numpy(np.asarray(shards.arrays["tok_rgb"][:4], np.int64))
    coords = torch.from_numpy(np.asarray(shards.arrays["coords"][:4], np.int64))
    cfg = GenerationConfig(temperature=0.0, maskgit_steps=2, steps=2)
    res = generate(fitted.model, {"tok_rgb": rgb, "coords": coords}, cfg)
    head = fitted.model.next_frame
    t6 = lambda r, k: pose_points(r.coords_next[:, k, -39:])  # noqa: E731  (the skeleton at t+6)
    with torch.no_grad():
        head.margin.fill_(0.0)
        head.copy_gain.fill_(-5.0)  # a head whose guesses differ from the present frame
        first = head.predict(rgb, *pose_points(coords), *t6(res, 0))
        res0 = generate(fitted.model, {"tok_rgb": rgb, "coords": coords}, cfg)
        second = head.predict(first, *t6(res0, 0), *t6(res0, 1))
    assert torch.equal(res0.tok_rgb_next[:, 0], first)
    assert torch.equal(res0.tok_rgb_next[:, 1], second)  # the roll-out feeds it back
    assert not torch.equal(first, rgb)
    assert torch.equal(res0.coords_next[:, 0], res.coords_next[:, 0])  # not made from it
    with torch.no_grad():  # a skeleton read from the frame gets the head's margin_read
        head.margin_read.fill_(float("inf"))
        alone = generate(fitted.model, {"tok_rgb": rgb}, cfg)
        head.margin_read.fill_(0.0)
        alone0 = generate(fitted.model, {"tok_rgb": rgb}, cfg)
        read0 = head.predict(rgb, *pose_points(alone0.coords), *t6(alone0, 0), 0.0)
    assert torch.equal(alone.tok_rgb_next[:, 0], rgb)
    assert torch.equal(alone0.tok_rgb_next[:, 0], read0) and not torch.equal(read0, rgb)
    assert fit_main([str(ck), "--data", str(prepared), "--out", str(tmp_path / "m"), "--steps", "2", "--margin", "0.25"]) == 0  # fmt: skip
    assert load_checkpoint(tmp_path / "m").config["extra"]["next_frame"]["margin"] == 0.25
    assert float(load_checkpoint(tmp_path / "m").model.next_frame.margin) == 0.25

    assert fit_main([str(ck), "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    assert fit_main([str(ck), "--data", str(prepared), "--out", str(tmp_path / "n"), "--margin", "-1"]) == 2  # fmt: skip
    assert "margin must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fit_main([str(ck), "--data", str(prepared), "--out", str(ck)])


def test_pose_reader_shift_moves_tokens_and_joints_together():
    """The reader's training augmentation moves the token grid by whole tokens, fills the gap
    with the edge tokens, moves the joints by as many cells, and says which left the frame."""
    from training.pose_reader import shift_grid

    rgb = torch.arange(256).expand(2, 256)
    xy = torch.tensor([[[0.5, 0.5], [0.97, 0.1]], [[0.5, 0.5], [0.1, 0.02]]])
    moved, new_xy, inside = shift_grid(rgb, xy, torch.tensor([1, 0]), torch.tensor([0, -1]))
    a, b = moved.view(2, 16, 16), rgb.view(2, 16, 16)
    assert torch.equal(a[0, :, 1:], b[0, :, :-1]) and torch.equal(a[0, :, 0], b[0, :, 0])
    assert torch.equal(a[1, :-1], b[1, 1:]) and torch.equal(a[1, -1], b[1, -1])
    torch.testing.assert_close(new_xy[0], xy[0] + torch.tensor([1 / 16, 0.0]))
    torch.testing.assert_close(new_xy[1], xy[1] - torch.tensor([0.0, 1 / 16]))
    assert inside.tolist() == [[True, False], [True, False]]


SHORT = {"batch_size": 4, "input_tokens": 40, "target_tokens": 24, "weight": 0.5,
         "alpha_mixtures": [{"inputs": {"coords": 1}, "targets": {"coords_next": 1, "action": 1}},
                            {"inputs": {"coords": 1, "action": 1}, "targets": {"coords_next": 1}}]}  # fmt: skip


def test_short_batch_trains_beside_the_main_batch_and_resumes_exactly(prepared, tmp_path):
    """A format-2 run with a second, short batch a step: its tokens count in the plan, its
    losses are logged and validated apart, and a resumed run repeats the same losses."""
    from training.config import make_config
    from training.plan import make_plan

    cfg = {**TINY, "data_dir": str(prepared), "model": {**TINY["model"], "format": 2},
           "short_batch": SHORT, "total_tokens": "3072", "eval_interval": "1024"}  # fmt: skip
    assert make_plan(make_config(cfg), 1).tokens_per_step == 4 * 64 + 4 * 64
    whole = train({**cfg, "output_dir": str(tmp_path / "a")})
    assert whole.finished and len(whole.losses) == 6 and all(np.isfinite(whole.losses))
    assert {"coords_next", "short_coords_next", "short_action"} <= set(whole.val)
    rows = (tmp_path / "a" / "logs" / "metrics.csv").read_text().splitlines()
    assert "train/short_ce_coords_next" in {r.split(",")[1] for r in rows[1:]}
    first = train({**cfg, "output_dir": str(tmp_path / "b"), "stop_after_steps": 3})
    rest = train({**cfg, "output_dir": str(tmp_path / "b")})
    assert first.losses + rest.losses == pytest.approx(whole.losses, rel=1e-6, abs=1e-6)
    # without it the same run takes other steps: the short batch's loss is in every step
    plain = train({**cfg, "short_batch": {}, "output_dir": str(tmp_path / "c"),
                   "total_tokens": "1536"})  # fmt: skip
    assert plain.losses[0] != pytest.approx(whole.losses[0])


@pytest.mark.parametrize(
    "short, match",
    [
        ({**SHORT, "size": 3}, "unknown key"),
        ({k: v for k, v in SHORT.items() if k != "target_tokens"}, "needs"),
        ({**SHORT, "batch_size": 0}, "batch_size must be an integer"),
        ({**SHORT, "weight": -1}, "weight must be a number > 0"),
        ({**SHORT, "alpha_mixtures": []}, "non-empty list"),
        (
            {**SHORT, "alpha_mixtures": [{"inputs": {"coords_next": 1}, "targets": {"coords": 1}}]},
            "cannot be an input",
        ),
    ],
)
def test_short_batch_config_errors_name_the_key(short, match):
    from training.config import make_config

    with pytest.raises(ValueError, match=match):
        make_config({**TINY, "short_batch": short})


def test_short_batch_needs_a_format_2_model(prepared, tmp_path):
    with pytest.raises(ValueError, match="format-2"):
        train(
            {**TINY, "data_dir": str(prepared), "output_dir": str(tmp_path), "short_batch": SHORT}
        )


def test_one_format_2_run_trains_every_parameter_the_served_model_has(prepared, tmp_path):
    """One train() call: every weight of the exported format-2 model moved from its initial
    value (without weight decay only a gradient moves one), so `generate` uses nothing
    trained elsewhere."""
    from m2core.checkpoint import load_checkpoint
    from m2core.model_v2 import M2ModelV2
    from training.builders import model_config
    from training.config import make_config
    from training.data.shards import load_meta

    cfg = {**TINY, "data_dir": str(prepared), "output_dir": str(tmp_path / "r"),
           "model": {**TINY["model"], "format": 2, "query_shape": True, "stem_layers": 3,
                     "caption_action": True, "shape_fourier": 16, "motion_head": True,
                     "motion_dense": True, "read_ce": 0.5, "read_heat": True},
           "weight_decay": 0.0, "total_tokens": "4096", "short_batch": SHORT,
           "motion_batch": 8, "read_batch": 4}  # fmt: skip
    res = train(cfg)
    log = (tmp_path / "r" / "logs" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(r) for r in log]  # the motion path's own term is logged beside the rest
    for side in ("train", "val"):
        assert any(f"{side}/ce_coords_next_whole" in r for r in rows)
    assert any("train/ce_coords_heat" in r for r in rows)  # and the heat map's extra frames'
    torch.manual_seed(0)  # train() builds its model right after seeding with cfg.seed
    start = M2ModelV2(model_config(make_config(cfg), load_meta(prepared))).state_dict()
    served = load_checkpoint(res.final_dir).model.state_dict()
    assert set(served) == set(start)
    still = [k for k, v in served.items() if torch.equal(v.float(), start[k].float())]
    assert still == []
    # the export step calibrated the copy margin on the validation split and recorded it
    bundle = load_checkpoint(res.final_dir)
    found = bundle.config["extra"]["calibration"]["copy_margin"]
    assert bundle.model.config.copy_margin == found["copy_margin"]
    assert found["accuracy"] >= found["copying"] and found["tokens"] > 0
    assert "Copy margin" in (res.final_dir / "MODEL_CARD.md").read_text()
