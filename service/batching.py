"""Dynamic batching: concurrent requests gathered into one model call, off the event loop.

One asyncio task takes jobs from a bounded queue: it waits for the first, then gathers
more until the batch is full or `max_wait` has passed since the first, runs
`predict(list_of_items)` on a single model thread (so model calls never overlap), checks
that it got one output per input, and resolves each request's future. Callers never see
the queue: `await batcher.submit(item, timeout)`.

Backpressure: a full queue refuses at once with 503 and a `Retry-After` derived from
the measured batch time. Deadlines: a request that waits past its timeout gets 504 and
is dropped from the queue if its batch has not started (a started batch finishes; its
answer for that request is discarded).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from service.errors import ServiceError
from service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchInfo:
    """How a request was served: seconds queued, seconds of its batch's model call, batch size."""

    queue_s: float
    model_s: float
    batch_size: int


@dataclass
class _Job:
    item: Any
    future: asyncio.Future
    enqueued: float


class Batcher:
    def __init__(
        self,
        predict: Callable[[list[Any]], Sequence[Any]],
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Metrics,
    ):
        self.predict = predict
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.metrics = metrics
        self.batch_seconds = 0.0  # moving average of one model call, for Retry-After
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="m2-model")
        self._task = asyncio.create_task(self._loop(), name="m2-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(ServiceError(503, "shutting_down", "server is stopping"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def retry_after(self) -> int:
        """Seconds until a refused request would likely find room: queued batches x batch time."""
        batches_ahead = math.ceil(self.depth / self.max_batch_size) + 1
        return max(1, math.ceil(batches_ahead * max(self.batch_seconds, 0.05)))

    # --- the caller's side -----------------------------------------------------------------
    async def submit(self, item: Any, timeout_s: float) -> tuple[Any, BatchInfo]:
        """Queue `item`, wait for its output: (output, BatchInfo). 503 if full, 504 if late."""
        if self._queue is None:
            raise ServiceError(503, "not_ready", "the model is not loaded yet")
        if timeout_s <= 0:
            self.metrics.rejected.labels("deadline").inc()
            raise ServiceError(
                504, "deadline_exceeded", "the request's deadline passed before queueing"
            )
        job = _Job(item, asyncio.get_running_loop().create_future(), time.perf_counter())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.metrics.rejected.labels("queue_full").inc()
            wait = self.retry_after()
            raise ServiceError(
                503, "overloaded", f"the prediction queue is full; retry in about {wait} s",
                headers={"Retry-After": str(wait)},
            ) from None  # fmt: skip
        self.metrics.queue_depth.set(self.depth)
        try:
            return await asyncio.wait_for(job.future, timeout_s)
        except TimeoutError:
            self.metrics.rejected.labels("deadline").inc()
            raise ServiceError(
                504,
                "deadline_exceeded",
                f"no prediction within the {timeout_s:.2f} s left to this request",
            ) from None

    # --- the loop --------------------------------------------------------------------------
    async def _gather(self) -> list[_Job]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        until = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = until - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            self.metrics.queue_depth.set(self.depth)
            live = [j for j in batch if not j.future.done()]  # drop requests that timed out
            if not live:
                continue
            try:
                await self._run(loop, live)
            except Exception:  # never let one bad batch kill the loop
                log.exception("batch of %d failed", len(live))

    async def _run(self, loop: asyncio.AbstractEventLoop, live: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(
                self._executor, self.predict, [j.item for j in live]
            )
            if len(outputs) != len(live):
                raise RuntimeError(
                    f"predict returned {len(outputs)} outputs for {len(live)} inputs"
                )
        except asyncio.CancelledError:  # shutting down mid-batch: answer, do not hang
            for j in live:
                if not j.future.done():
                    j.future.set_exception(ServiceError(503, "shutting_down", "server is stopping"))
            raise
        except Exception as e:
            log.exception("model call failed for a batch of %d", len(live))
            err = e if isinstance(e, ServiceError) else ServiceError(
                500, "model_error", f"the model failed on this batch: {type(e).__name__}"
            )  # fmt: skip
            for j in live:
                if not j.future.done():
                    j.future.set_exception(err)
            return
        model_s = time.perf_counter() - start
        self.batch_seconds = (
            model_s if not self.batch_seconds else 0.8 * self.batch_seconds + 0.2 * model_s
        )
        self.metrics.batch_size.observe(len(live))
        self.metrics.model_seconds.observe(model_s)
        for j, out in zip(live, outputs, strict=True):
            queue_s = start - j.enqueued
            self.metrics.queue_seconds.observe(queue_s)
            if not j.future.done():
                j.future.set_result((out, BatchInfo(queue_s, model_s, len(live))))
