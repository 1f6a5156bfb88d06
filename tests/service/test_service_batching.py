"""Dynamic batching, backpressure, deadlines and the bounded store, with the real model."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from starlette.testclient import TestClient
from svc_helpers import png_bytes, settings_for, wait_ready

from service.app import create_app
from service.batching import Batcher
from service.errors import ServiceError
from service.metrics import Metrics
from service.store import Prediction, PredictionStore


def _post(client: TestClient, frame: bytes, **data):
    files = {"frame": ("f.png", frame, "image/png")}
    return client.post("/predict", files=files, data={k: str(v) for k, v in data.items()})


def _answer(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("id", "links", "timings_ms")}


def test_concurrent_requests_share_a_model_call_and_get_their_own_answers(checkpoint_dir):
    frames = [png_bytes(96, 64, seed=i) for i in range(4)]
    app = create_app(settings_for(checkpoint_dir, max_batch_size=4, max_wait_ms=300, warmup=False))
    with TestClient(app) as c:
        solo = [_post(c, f, seed=i).json() for i, f in enumerate(frames)]
        assert all(s["timings_ms"]["batch_size"] == 1 for s in solo)
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda i: _post(c, frames[i], seed=i), range(4)))
        assert all(r.status_code == 200 for r in together)
        sizes = [r.json()["timings_ms"]["batch_size"] for r in together]
        assert max(sizes) > 1, sizes
        # Split back right: each request's answer is the one it gets alone.
        for s, r in zip(solo, together, strict=True):
            assert _answer(r.json()) == _answer(s)
        m = c.get("/metrics").text
        assert 'm2_batch_size_bucket{le="1.0"}' in m


def test_full_queue_answers_503_with_retry_after(checkpoint_dir):
    app = create_app(
        settings_for(checkpoint_dir, max_batch_size=1, max_queue=1, max_wait_ms=0, warmup=False)
    )
    with TestClient(app) as c:
        with ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda i: _post(c, png_bytes(64, 48, seed=i), steps=4), range(8)))
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert int(busy.headers["Retry-After"]) >= 1
        assert busy.json()["error"]["code"] == "overloaded"
        assert _post(c, png_bytes()).status_code == 200  # and it recovers
        assert 'm2_rejected_total{reason="queue_full"}' in c.get("/metrics").text


def test_deadline_answers_504_and_the_loop_survives(checkpoint_dir):
    app = create_app(settings_for(checkpoint_dir, request_timeout_s=0.02, warmup=False))
    with TestClient(app) as c:
        r = _post(c, png_bytes(), steps=4)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert 'm2_rejected_total{reason="deadline"}' in c.get("/metrics").text
        assert c.get("/healthz").status_code == 200


def test_batcher_refuses_beyond_queue_and_checks_output_count():
    """The Batcher alone, around plain functions: its own contract."""

    async def scenario():
        calls = []

        def echo(items):
            calls.append(list(items))
            return [x * 10 for x in items]

        b = Batcher(echo, max_batch_size=8, max_wait_s=0.01, max_queue=2, metrics=Metrics())
        await b.start()
        results = await asyncio.gather(
            *(b.submit(i, 5.0) for i in range(4)), return_exceptions=True
        )
        await b.stop()
        lost = Batcher(lambda items: items[:-1], 8, 0.01, 8, Metrics())  # one output short
        await lost.start()
        short = await asyncio.gather(
            *(lost.submit(i, 5.0) for i in range(3)), return_exceptions=True
        )
        after = await asyncio.gather(lost.submit(5, 5.0), return_exceptions=True)
        await lost.stop()
        return calls, results, short, after

    calls, results, short, after = asyncio.run(scenario())
    # Two fit the queue; the other two are refused at once with 503 + Retry-After.
    assert [r[0] for r in results[:2]] == [0, 10] and calls == [[0, 1]]
    assert all(
        isinstance(r, ServiceError) and r.status == 503 and "Retry-After" in r.headers
        for r in results[2:]
    )
    assert results[0][1].batch_size == 2
    # A predict that loses an output fails its whole batch (never a wrong pairing) ...
    assert all(isinstance(r, ServiceError) and r.status == 500 for r in short)
    # ... and the loop keeps serving (here: the lone item's output is dropped again).
    assert isinstance(after[0], ServiceError) and after[0].code == "model_error"


def _prediction(nbytes: int = 1000) -> Prediction:
    return Prediction(b"\0" * nbytes, 1.0, np.zeros((13, 3)), np.zeros((1, 6, 13, 3)), [b""], "v")


def test_store_is_bounded_by_count_bytes_and_time():
    now = [0.0]
    store = PredictionStore(max_items=3, max_bytes=20_000, ttl_s=60, clock=lambda: now[0])
    ids = [store.put(_prediction()) for _ in range(5)]
    assert len(set(ids)) == 5 and all(len(i) >= 22 for i in ids)
    assert [store.get(i) is not None for i in ids] == [False, False, True, True, True]
    assert store.bytes == 3 * _prediction().nbytes() < 12_000
    store.attach(ids[4], "gif", b"\0" * 4500)  # still within 20 KB
    assert len(store) == 3
    store.attach(ids[3], "gif", b"\0" * 4500)  # over: the oldest goes, not the one served
    assert store.get(ids[2]) is None and store.get(ids[3]).cache["gif"]
    assert len(store) == 2 and store.bytes <= 20_000
    now[0] = 61.0
    assert store.get(ids[4]) is None and len(store) == 0 and store.bytes == 0


def test_service_keeps_only_the_newest_predictions(checkpoint_dir):
    app = create_app(settings_for(checkpoint_dir, store_max_items=3, warmup=False))
    with TestClient(app) as c:
        wait_ready(c)
        ids = [_post(c, png_bytes(32, 32)).json()["id"] for _ in range(5)]
        codes = [c.get("/next_frame.png", params={"id": i}).status_code for i in ids]
        assert codes == [404, 404, 200, 200, 200]
        assert "m2_store_items 3.0" in c.get("/metrics").text
