"""The FastAPI app: `create_app(settings)` builds it; the lifespan loads the model once.

Nothing heavy happens at import time. In the lifespan: load the checkpoint onto the
device (a missing or damaged one raises `StartupError` with one clear line), start the
batching loop, then run a warm-up prediction in the background: `/healthz` answers at
once, `/readyz` only after the warm-up passed.

`/docs` (Swagger UI) and `/redoc` load their scripts and styles from `/docs-static/`,
files shipped in the `fastapi-offline` wheel, never from a CDN: they work offline. They
need the API key when one is set, like every route but health.

Middleware, outermost first: metrics (counts every answer, 401/413 included) -> CORS
(only when origins are configured) -> API key (only when one is set) -> body cap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batching import Batcher
from service.errors import install_error_handlers
from service.metrics import Metrics, MetricsMiddleware
from service.middleware import ApiKeyMiddleware, BodyLimitMiddleware
from service.openapi import install_openapi
from service.pipeline import Pipeline
from service.predictor import M2Predictor
from service.routes import OPEN_PATHS, router
from service.settings import Settings
from service.store import PredictionStore

log = logging.getLogger(__name__)

DOCS_STATIC = "/docs-static"  # where the Swagger UI / ReDoc assets are served


class StartupError(RuntimeError):
    """The service cannot start (no or damaged checkpoint, no such device): one line."""


class _QuietStartupFailure:
    """Pure ASGI: when startup fails with a `StartupError`, keep Starlette's formatted
    traceback away from the server's log (`m2 serve` prints the one-line reason)."""

    def __init__(self, app: ASGIApp, owner: FastAPI) -> None:
        self.app, self.owner = app, owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def quiet_send(message: Message) -> None:
            error = getattr(self.owner.state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and error:
                message = {**message, "message": ""}
                log.debug("startup failed: %s", error)
            await send(message)

        await self.app(scope, receive, quiet_send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        predictor = M2Predictor(settings)
        try:
            device = settings.resolved_device()
            await run_in_threadpool(predictor.setup, device)
        except (OSError, ValueError) as e:  # CheckpointError is a ValueError
            reason = " ".join(str(e).split())  # one line, even for torch's multi-line errors
            app.state.startup_error = f"cannot load checkpoint {settings.checkpoint}: {reason}"
            raise StartupError(app.state.startup_error) from None
        batcher = Batcher(
            predictor.predict, settings.max_batch_size, settings.max_wait_ms / 1000.0,
            settings.max_queue, metrics,
        )  # fmt: skip
        await batcher.start()
        store = PredictionStore(
            settings.store_max_items, settings.store_max_bytes, settings.store_ttl_s
        )
        pipeline = Pipeline(settings, predictor, batcher, store, metrics)
        app.state.pipeline = pipeline
        warm = None
        if settings.warmup:
            warm = asyncio.create_task(pipeline.warm_up(), name="m2-warmup")
        else:
            pipeline.ready, pipeline.ready_detail = True, "ok (warm-up disabled)"
        log.info(
            "m2 service up: %s on %s, version %s", settings.checkpoint, device, predictor.version
        )
        try:
            yield
        finally:
            if warm is not None:
                warm.cancel()
                await asyncio.gather(warm, return_exceptions=True)
            await batcher.stop()
            app.state.pipeline = None

    app = FastAPIOffline(  # FastAPI with /docs and /redoc on local assets
        title="M2",
        version="0.1.0",
        summary="From one video frame: the skeleton now, a caption, the next six skeletons "
        "and the next key frame.",
        lifespan=lifespan,
        static_url=DOCS_STATIC,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.pipeline = None
    install_error_handlers(app)
    app.include_router(router)
    install_openapi(app, settings)  # the limits, media types and links FastAPI cannot infer

    # add_middleware wraps: the last added is the outermost.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None and settings.api_key.get_secret_value():
        app.add_middleware(
            ApiKeyMiddleware, api_key=settings.api_key.get_secret_value(), open_paths=OPEN_PATHS
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(_QuietStartupFailure, owner=app)
    return app
