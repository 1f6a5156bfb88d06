"""Subnormal floats flushed to zero on the CPU.

A trained model's attention is sharp: its softmax backward makes many probabilities below
1e-38, and x86 cores compute on such subnormal floats many times slower. Flushing them
costs nothing measurable in accuracy (they are below every loss's resolution) and keeps a
late training step as fast as an early one (docs/model.md, "Speed"). The CPU flag is per
thread and a thread copies it from the thread that starts it, so call `flush_denormals`
before torch starts its worker threads: first thing in a process.
"""

from __future__ import annotations

import torch

_PROBE = 1 << 20  # elements: enough for every intra-op thread to take a share


def flush_denormals() -> bool:
    """Flush subnormals in this thread (and the threads it starts later) -> whether the
    threads of a parallel op now all flush (False: no such CPU flag here, or torch's thread
    pool was started before this call and its threads keep their own)."""
    if not torch.set_flush_denormal(True):
        return False
    tiny = torch.full((_PROBE,), 1e-30) * 1e-10  # 1e-40: subnormal unless flushed
    return bool((tiny == 0).all())
