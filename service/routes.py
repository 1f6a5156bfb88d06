"""The HTTP routes: thin handlers over `Pipeline`, documented with their error answers.

Nothing a request carries is ever used as a filesystem path: the page and its assets
are read from the package once, when the module is imported, and served from memory.
What the signatures cannot say (media types, settings' limits, links) `service.openapi`
adds to the document.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, Response
from pydantic import BeforeValidator

from service.errors import ServiceError, error_response
from service.metrics import PROMETHEUS_CONTENT_TYPE, Metrics
from service.pipeline import Pipeline
from service.predictor import RawRequest
from service.schemas import ErrorBody, Health, PredictResponse, Ready

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # answered without an API key
INDEX_HTML = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    reasons = {
        401: "API key missing or wrong (only when M2_API_KEY is set)",
        404: "unknown or expired prediction id (or a step the prediction does not have)",
        413: "body over the size cap, or an image with too many pixels (refused before decoding)",
        415: "not an image, a format not accepted, or a content type that does not match the data",
        422: "a damaged/truncated image, or a bad field (coords, steps, temperature, seed, caption, action)",
        503: "the queue is full (see Retry-After) or the model is not loaded",
        504: "no answer within the per-request deadline",
    }
    return {c: {"model": ErrorBody, "description": reasons[c]} for c in codes}


def _none_if_blank(value: Any) -> Any:
    """An optional form field sent empty or as `null` means "not given", as if left out:
    an HTML form sends its empty inputs, JavaScript's `FormData` turns a null into "null"."""
    if isinstance(value, str) and value.strip() in ("", "null"):
        return None
    return value


NotGivenIfBlank = BeforeValidator(_none_if_blank)


def get_pipeline(request: Request) -> Pipeline:
    pipeline = request.app.state.pipeline
    if pipeline is None:
        raise ServiceError(503, "not_ready", "the model is not loaded")
    return pipeline


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
IdQuery = Annotated[str, Query(min_length=1, max_length=64, description="prediction id")]

router = APIRouter()


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=_errors(401, 413, 415, 422, 503, 504),
    summary="Predict from one frame",
)
async def predict(
    request: Request,
    pipeline: PipelineDep,
    frame: Annotated[UploadFile, File(description="PNG, JPEG, WebP or BMP")],
    coords: Annotated[
        str | None,
        NotGivenIfBlank,
        Form(description="JSON: 13 x [x, y, visible] in the upload's pixels"),
    ] = None,
    caption: Annotated[
        str | None, NotGivenIfBlank, Form(description="a sentence about the frame")
    ] = None,
    steps: Annotated[int, Form(description="roll-out steps")] = 1,
    temperature: Annotated[
        float | None,
        NotGivenIfBlank,
        Form(
            description="sampling temperature (0 = most likely); a checkpoint with a "
            "next-frame head gives its next key frame without sampling"
        ),
    ] = None,
    seed: Annotated[int | None, NotGivenIfBlank, Form(description="same seed, same answer")] = None,
    action: Annotated[
        str | None,
        NotGivenIfBlank,
        Form(
            description="an action name of the checkpoint (steers the forecast; format-2 checkpoints)"
        ),
    ] = None,
) -> PredictResponse:
    """The skeleton now, a caption, the next skeletons and key frames, from one frame.

    Optional fields (`coords`, `caption`, `temperature`, `seed`, `action`) may be left
    out, sent empty or sent as `null`: all three mean "not given". The response's `id` leads to
    the GIF and the PNG (see the links of the 200 answer).
    """
    received = getattr(request.state, "received", None) or time.perf_counter()
    raw = RawRequest(
        await frame.read(), frame.content_type, coords, caption, steps, temperature, seed, action
    )
    response = await pipeline.predict(raw, received, root=request.scope.get("root_path", ""))
    return response


@router.get(
    "/rollout.gif",
    response_class=Response,
    responses={200: {"content": {"image/gif": {}}}, **_errors(401, 404, 422)},
    summary="The predicted motion as an animated GIF",
)
async def rollout_gif(
    request: Request,
    pipeline: PipelineDep,
    id: IdQuery,
    overlay: Annotated[bool, Query(description="draw over the uploaded frame")] = True,
    side_by_side: Annotated[bool, Query(description="add the predicted key frame")] = False,
) -> Response:
    pipeline.lookup(id)  # 404 before anything else
    etag = '"' + hashlib.sha256(f"{id}|{overlay}|{side_by_side}".encode()).hexdigest()[:32] + '"'
    headers = _cache_headers(pipeline, id, etag)
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    data = await pipeline.gif(id, overlay, side_by_side)
    return Response(data, media_type="image/gif", headers=headers)


@router.get(
    "/next_frame.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_errors(401, 404, 422)},
    summary="The decoded predicted next key frame",
)
async def next_frame(
    request: Request,
    pipeline: PipelineDep,
    id: IdQuery,
    step: Annotated[int, Query(description="roll-out step, 1-based")] = 1,
) -> Response:
    data = pipeline.next_frame(id, step)
    etag = '"' + hashlib.sha256(f"{id}|png|{step}".encode()).hexdigest()[:32] + '"'
    headers = _cache_headers(pipeline, id, etag)
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="image/png", headers=headers)


def _cache_headers(pipeline: Pipeline, pid: str, etag: str) -> dict[str, str]:
    max_age = int(pipeline.store.remaining_ttl(pid))
    return {"ETag": etag, "Cache-Control": f"private, max-age={max_age}, immutable"}


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Ready,
    responses=_errors(503),
    summary="Model loaded and a warm-up prediction passed",
)
async def readyz(request: Request) -> Any:
    pipeline = request.app.state.pipeline
    if pipeline is None or not pipeline.ready:
        detail = pipeline.ready_detail if pipeline is not None else "model not loaded"
        return error_response(503, "not_ready", detail, headers={"Retry-After": "1"})
    return Ready(
        status="ready", model_version=pipeline.predictor.version,
        device=pipeline.predictor.device, detail=pipeline.ready_detail,
    )  # fmt: skip


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(request: Request, m: MetricsDep) -> Response:
    pipeline = request.app.state.pipeline
    if pipeline is not None:
        m.queue_depth.set(pipeline.batcher.depth)
    return Response(m.render(), media_type=PROMETHEUS_CONTENT_TYPE)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(INDEX_HTML, headers={"Cache-Control": "no-cache"})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    return Response(status_code=204)
