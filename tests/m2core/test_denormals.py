"""Subnormal floats are flushed in every thread when the process asks before torch starts
its worker threads, which is what `train()` does first."""

import os
import subprocess
import sys

import pytest

PROBE = "from m2core.denormals import flush_denormals; print(flush_denormals())"


def _run(code: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_every_thread_flushes_when_asked_first_and_the_probe_sees_when_not():
    if _run("import torch; print(torch.set_flush_denormal(True))") != "True":
        pytest.skip("this CPU has no flush-to-zero flag")
    # what `accelerate launch training/train.py` does: import the training code, then train()
    assert _run("import training.train\n" + PROBE) == "True"
    # a parallel op first starts the thread pool without the flag: the probe must say so
    started = "import torch; torch.set_num_threads(2); (torch.randn(1 << 22) * 2).sum()\n"
    assert _run(started + PROBE) == "False"
