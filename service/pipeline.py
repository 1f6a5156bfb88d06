"""One prediction end to end, and the lazily rendered pictures: what the routes call.

`Pipeline.predict` = decode the upload (worker thread, at most `decode_concurrency` at
once so memory stays bounded) -> batched model call (`Batcher`) -> encode the response
(worker thread) -> keep what the GIF / PNG routes need in the bounded store. It times
each stage; the per-request deadline covers all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from service.batching import Batcher
from service.errors import ServiceError
from service.metrics import Metrics
from service.predictor import M2Predictor, RawRequest
from service.render import render_gif, warmup_png
from service.schemas import Links, PredictResponse, Timings
from service.settings import Settings
from service.store import Prediction, PredictionStore

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    settings: Settings
    predictor: M2Predictor
    batcher: Batcher
    store: PredictionStore
    metrics: Metrics
    ready: bool = False
    ready_detail: str = "warming up"
    _decode_slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._decode_slots = asyncio.Semaphore(self.settings.decode_concurrency)

    async def predict(self, raw: RawRequest, received: float, root: str = "") -> PredictResponse:
        """The full /predict path. `received` is the request's perf_counter arrival time."""
        async with self._decode_slots:
            t0 = time.perf_counter()
            item = await run_in_threadpool(self.predictor.decode_request, raw)
        t1 = time.perf_counter()
        left = self.settings.request_timeout_s - (t1 - received)
        output, info = await self.batcher.submit(item, left)
        t2 = time.perf_counter()
        fields, pred = await run_in_threadpool(self.predictor.encode_response, item, output)
        pid = self.store.put(pred)
        self._store_gauges()
        t3 = time.perf_counter()
        ms = 1000.0
        timings = Timings(
            decode=(t1 - t0) * ms, queue=info.queue_s * ms, model=info.model_s * ms,
            encode=(t3 - t2) * ms, total=(t3 - received) * ms, batch_size=info.batch_size,
        )  # fmt: skip
        links = Links(
            gif=f"{root}/rollout.gif?id={pid}",
            gif_plain=f"{root}/rollout.gif?id={pid}&overlay=false",
            next_frame=f"{root}/next_frame.png?id={pid}",
        )
        return PredictResponse(
            id=pid, device=self.predictor.device, dtype=self.predictor.dtype,
            model_version=self.predictor.version, timings_ms=timings, links=links, **fields,
        )  # fmt: skip

    def lookup(self, pid: str) -> Prediction:
        pred = self.store.get(pid)
        if pred is None:
            raise ServiceError(
                404, "unknown_id", "no prediction with this id (unknown or expired)", "id"
            )
        return pred

    async def gif(self, pid: str, overlay: bool, side_by_side: bool) -> bytes:
        """The roll-out GIF, rendered once per variant and cached in the store."""
        pred = self.lookup(pid)
        variant = f"gif:{int(overlay)}{int(side_by_side)}"
        cached = pred.cache.get(variant)
        if cached is not None:
            return cached
        data = await run_in_threadpool(
            render_gif, pred, overlay, side_by_side, self.settings.gif_frame_ms
        )
        self.store.attach(pid, variant, data)
        self._store_gauges()
        return data

    def next_frame(self, pid: str, step: int) -> bytes:
        """A step outside [1, max_steps] is a bad field (422); a step this prediction did
        not roll out (step 3 of 2) is a key frame that does not exist (404)."""
        pred = self.lookup(pid)
        if not 1 <= step <= self.settings.max_steps:
            raise ServiceError(
                422, "invalid_field", f"step must be in [1, {self.settings.max_steps}]", "step"
            )
        n = len(pred.next_frames_png)
        if step > n:
            raise ServiceError(
                404, "unknown_step", f"this prediction has {n} step(s), no step {step}", "step"
            )
        return pred.next_frames_png[step - 1]

    async def warm_up(self) -> None:
        """A real prediction on a bundled frame (and its GIF); /readyz says ok only after."""
        try:
            start = time.perf_counter()
            response = await self.predict(RawRequest(warmup_png(), "image/png"), start)
            await self.gif(response.id, overlay=True, side_by_side=True)
        except Exception as e:  # a failed warm-up keeps /readyz at 503, with the reason
            log.exception("warm-up prediction failed")
            self.ready_detail = f"warm-up prediction failed: {e}"
            return
        self.ready, self.ready_detail = True, "ok"
        log.info("warm-up prediction passed in %.2f s", time.perf_counter() - start)

    def _store_gauges(self) -> None:
        stats = self.store.stats()
        self.metrics.store_items.set(stats["items"])
        self.metrics.store_bytes.set(stats["bytes"])
