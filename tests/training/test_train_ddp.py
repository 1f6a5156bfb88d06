"""Data parallel on CPU: `torchrun --nproc_per_node 2 training/train.py` (gloo, MULTI_CPU)
matches one process with two accumulation steps at the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    """Run in a new session so a timeout also ends torchrun's worker processes."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, None, out, err)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _torchrun(config: Path, out: Path) -> tuple[subprocess.CompletedProcess, dict[int, str]]:
    """train.py in 2 processes, writing to `out`. Each rank's stdout + stderr go to its own
    file (torchrun --redirects, under `out`-logs), returned as {rank: text}: the launcher's
    own stderr only says which rank died, that rank's log says why."""
    log_dir = out.with_name(out.name + "-logs")
    cmd = [*TORCHRUN, "--log-dir", str(log_dir), "--redirects", "3", SCRIPT,
           "--config", str(config), f"output_dir={out}"]  # fmt: skip
    run = _run(cmd, ENV)
    logs = {}
    for err in sorted(log_dir.glob("*/attempt_*/*/stderr.log")):
        out_log = err.with_name("stdout.log")
        logs[int(err.parent.name)] = err.read_text() + (
            out_log.read_text() if out_log.is_file() else ""
        )
    return run, logs


def _why(run: subprocess.CompletedProcess, logs: dict[int, str]) -> str:
    """What a failed run left: the launcher's verdict, then the end of every rank's log."""
    ended = "timed out (killed)" if run.returncode is None else f"exited {run.returncode}"
    parts = [f"torchrun {ended}; its stderr ends:\n{run.stderr[-1500:]}"]
    parts += [f"----- rank {r} log ends:\n{text[-5000:]}" for r, text in logs.items()]
    return "\n".join(parts)


def _losses(run: Path) -> list[float]:
    rows = [json.loads(r) for r in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


# PYTHONFAULTHANDLER: a rank killed by a signal (SIGABRT from a C++ abort, say) prints
# every thread's Python stack into its log before it dies.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
SCRIPT = str(REPO / "training" / "train.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from m2core.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
    from training.data.prepare import PrepareOptions, prepare
    from training.synth.synth import generate

    tmp = tmp_path_factory.mktemp("ddp")
    generate(tmp / "synth", clips=3, seed=3, workers=1, frames=(20, 22), progress=False)
    torch.manual_seed(0)
    tok = ImageTokenizer(ImageTokenizerConfig(levels=(4, 4), channels=(8, 8, 16, 16), res_blocks=0))
    prepare(
        PrepareOptions(tmp / "synth", tok.save_pretrained(tmp / "tok"), tmp / "prep", workers=0)
    )
    return tmp / "prep"


def _config(tmp_path: Path, prepared: Path, **extra) -> Path:
    cfg = {
        "data_dir": str(prepared), "batch_size": 2, "num_tokens_per_sample": 64,
        "total_tokens": "768", "warmup_tokens": "256", "model_preset": "tiny",
        "model": {"dim": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1}, "eval_interval": 0,
        "checkpoint_interval": 0, "num_workers": 0, "log_interval": 1, "cpu": True, "resume": "none",
        **extra,
    }  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SHORT = {  # a format-2 model with a short batch: its backward runs unsynchronised, first
    "model": {"dim": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1, "format": 2},
    "short_batch": {"batch_size": 2, "input_tokens": 40, "target_tokens": 24, "alpha_mixtures": [
        {"inputs": {"coords": 1}, "targets": {"coords_next": 1, "action": 1}}]},
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, SHORT], ids=["format-1", "format-2-short-batch"])
def test_two_processes_match_one_at_the_same_global_batch(prepared, tmp_path, extra):
    path, env, script = _config(tmp_path, prepared, **extra), ENV, SCRIPT
    one = _run(
        [
            sys.executable,
            script,
            "--config",
            str(path),
            f"output_dir={tmp_path / 'one'}",
            "grad_accum=2",
        ],
        env,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two, logs = _torchrun(path, tmp_path / "two")
    assert two.returncode == 0, _why(two, logs)
    assert "2 device(s) x batch -> global batch 4 samples" in logs[0]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == (3 if not extra else 2)  # the short batch's tokens count too
    assert b == pytest.approx(a, rel=1e-4, abs=1e-4)
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_time_budget_with_two_processes_ends_together(prepared, tmp_path):
    """Both processes leave calibration at the same step and agree on the new total (a
    collective each step while calibrating): no hang, one plan, a serving checkpoint."""
    path = _config(tmp_path, prepared, total_tokens=10, time_budget=0.2, log_interval=20)
    run, logs = _torchrun(path, tmp_path / "b")
    assert run.returncode == 0, _why(run, logs)
    assert logs[0].count("time_budget 0.2 min") == 1  # logged by the main process only
    assert "time_budget" not in logs[1]
    assert (tmp_path / "b" / "final" / "model.safetensors").is_file()
