"""A bounded, expiring in-memory store of predictions (for the GIF and PNG routes).

Bounded three ways so memory stays flat under any load: a count cap, a byte cap (the
sizes of what each entry holds, cached GIFs included) and a time to live. The oldest
entries go first. Thread-safe: GIFs are rendered in worker threads and added back with
`attach`, which charges their bytes to the same budget.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def new_id() -> str:
    """An unguessable id from the OS CSPRNG (128 bits, URL-safe)."""
    return secrets.token_urlsafe(16)


@dataclass
class Prediction:
    """What the GIF and PNG routes need of one prediction, in compact form."""

    background_jpeg: bytes  # the upload (oriented), longer side <= gif_max_side
    thumb_scale: float  # thumbnail pixels per upload pixel
    coords: np.ndarray  # (13, 3) upload pixels + visible
    coords_next: np.ndarray  # (steps, 6, 13, 3) upload pixels + visible
    next_frames_png: list[bytes]  # per step: the decoded predicted key frame
    model_version: str
    # per joint in [0, 1]: (13,) now, (steps, 6, 13) future; None: the checkpoint has none
    confidence: tuple[np.ndarray, np.ndarray] | None = None
    cache: dict[str, bytes] = field(default_factory=dict)  # rendered GIFs by variant

    def nbytes(self) -> int:
        n = len(self.background_jpeg) + self.coords.nbytes + self.coords_next.nbytes
        n += sum(c.nbytes for c in self.confidence) if self.confidence is not None else 0
        n += sum(len(p) for p in self.next_frames_png)
        return n + sum(len(v) for v in self.cache.values()) + 512  # + object overhead


class PredictionStore:
    """id -> Prediction, at most `max_items` entries and `max_bytes` bytes, each for `ttl_s`."""

    def __init__(self, max_items: int, max_bytes: int, ttl_s: float, clock=time.monotonic):
        self.max_items, self.max_bytes, self.ttl_s = max_items, max_bytes, ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[float, Prediction]] = OrderedDict()  # id -> (expiry, p)
        self._sizes: dict[str, int] = {}
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def put(self, prediction: Prediction) -> str:
        """Store under a fresh id and return it; evicts the oldest entries to make room."""
        key = new_id()
        size = prediction.nbytes()
        with self._lock:
            self._items[key] = (self._clock() + self.ttl_s, prediction)
            self._sizes[key] = size
            self.bytes += size
            self._shrink(keep=key)
        return key

    def get(self, key: str) -> Prediction | None:
        """The prediction, or None when unknown or expired."""
        with self._lock:
            self._expire()
            entry = self._items.get(key)
            return entry[1] if entry and entry[0] > self._clock() else None

    def remaining_ttl(self, key: str) -> float:
        with self._lock:
            entry = self._items.get(key)
            return max(0.0, entry[0] - self._clock()) if entry else 0.0

    def attach(self, key: str, name: str, data: bytes) -> None:
        """Cache rendered bytes (a GIF) on an entry, charged to the byte budget."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None or name in entry[1].cache:
                return
            if len(data) > self.max_bytes // 4:  # one huge GIF must not flush the store
                return
            entry[1].cache[name] = data
            self._sizes[key] += len(data)
            self.bytes += len(data)
            self._shrink(keep=key)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._expire()
            return {"items": len(self._items), "bytes": self.bytes, "evictions": self.evictions}

    # --- internals (lock held) ---------------------------------------------------------
    def _drop(self, key: str) -> None:
        self._items.pop(key, None)
        self.bytes -= self._sizes.pop(key, 0)

    def _expire(self) -> None:
        now = self._clock()
        while self._items:
            key, (expiry, _) = next(iter(self._items.items()))
            if expiry > now:  # insertion order == expiry order (one TTL for all)
                break
            self._drop(key)

    def _shrink(self, keep: str) -> None:
        """Evict oldest first (never `keep`, the entry being served) until within budget."""
        self._expire()
        for key in list(self._items):
            if len(self._items) <= self.max_items and self.bytes <= self.max_bytes:
                break
            if key != keep:
                self._drop(key)
                self.evictions += 1
