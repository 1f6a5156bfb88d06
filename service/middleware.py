"""Pure ASGI middlewares that guard the app: the request body cap and the API key.

The body cap sits outside everything that reads the body. It answers 413 straight away
when Content-Length is over the cap, and otherwise counts bytes as they stream in
(chunked uploads included), stopping at the first byte over: the body is never read
whole. Nothing in FastAPI, Starlette or uvicorn caps a body on its own.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLarge, error_response


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                await error_response(400, "bad_request", "invalid Content-Length")(
                    scope, receive, send
                )
                return
            if int(length) > self.max_bytes:
                await self._reject(scope, receive, send)
                return

        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:  # the app already answered; nothing more can be said
                raise
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is larger than the {self.max_bytes:,} bytes allowed"
        # Connection: close -- the rest of the body will not be read.
        response = error_response(413, "body_too_large", message, headers={"Connection": "close"})
        await response(scope, receive, send)


class ApiKeyMiddleware:
    """When a key is configured, every route but the open ones needs it: 401 otherwise.

    Accepted as `X-API-Key: KEY`, `Authorization: Bearer KEY`, or HTTP Basic with KEY as
    the password (what a browser sends after its login prompt, so the web page works).
    """

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self.key = api_key.encode()
        self.open_paths = open_paths

    def _authorised(self, headers: Headers) -> bool:
        candidates = [headers.get("x-api-key", "")]
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            candidates.append(value.strip())
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
                candidates.append(decoded.partition(":")[2])
            except (binascii.Error, UnicodeDecodeError):
                pass
        ok = False
        for c in candidates:  # compare all in constant time, no early exit
            ok |= bool(c) and secrets.compare_digest(c.encode(), self.key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if self._authorised(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, "unauthorized", "a valid API key is required (X-API-Key or Authorization header)",
            headers={"WWW-Authenticate": 'Basic realm="m2", charset="UTF-8"'},
        )  # fmt: skip
        await response(scope, receive, send)
