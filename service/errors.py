"""Errors of the service: one exception type, one JSON body, the app's exception handlers.

Every failure a client can cause ends as `{"error": {"code", "message", "field"}}` with
its own status: never a 500 with a traceback, never a dead worker.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A request the service refuses: HTTP status, a short code, a message for a person."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field, self.headers = field, headers


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` mid-stream by the body cap. An HTTPException, so FastAPI's
    body parsing lets it through (it turns other errors into 400) to the handler here."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the {limit:,} bytes allowed")


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


def _code_for(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc, BodyTooLarge):  # the rest of the body is never read: close after
        return error_response(413, "body_too_large", exc.detail, headers={"Connection": "close"})
    if exc.status_code == 400 and request.url.path == "/predict" and _is_multipart(request):
        # The multipart parser gave up (no boundary, broken framing).
        return error_response(400, "bad_multipart", "the multipart/form-data body is malformed")
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return error_response(
        exc.status_code, _code_for(exc.status_code), message, headers=getattr(exc, "headers", None)
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    if request.url.path == "/predict" and request.method == "POST" and not _is_multipart(request):
        got = request.headers.get("content-type") or "no content type"
        return error_response(
            415,
            "unsupported_media_type",
            f"send multipart/form-data with a `frame` file, not {got}",
        )
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "form")]
    field = ".".join(loc) or None
    message = f"{field}: {first.get('msg', 'invalid')}" if field else str(first.get("msg"))
    return error_response(422, "invalid_field", message, field)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "the server failed on this request; see its log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
