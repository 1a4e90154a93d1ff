"""The API's abuse defences, installed on the app by ``create_app`` (see docs/SECURITY.md).

* A request-body limit (``max_body_bytes``): a declared ``Content-Length`` over it is refused before any byte
  is read, a streamed (chunked) body as soon as it passes the limit — HTTP 413 naming the limit.
* Per-API-key rate limits and the per-client-address failed-auth throttle (``nirvana.service.ratelimit``; the
  latter is charged by ``api.deps.authenticate`` before a key's database lookup): 429 with ``Retry-After``.
* Every framework error (unknown route, wrong method, unparseable body, invalid UTF-8) answers in the service's
  error shape ``{"error": {"type", "message", "field"?}}`` and says what was wrong.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nirvana.config import Settings
from nirvana.service.ratelimit import RateLimited, RateLimiter, retry_after_header


def _too_large_message(limit: int) -> str:
    return f"body: request body exceeds the limit of {limit} bytes (NIRVANA_MAX_BODY_BYTES)"


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once a streamed body passes the limit (an HTTPException, so FastAPI's body
    reader re-raises it instead of turning it into a generic 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large_message(limit))
        self.limit = limit


def _error(status: int, kind: str, message: str, field: str | None = None, headers: Any = None) -> JSONResponse:
    err: dict[str, Any] = {"type": kind, "message": message}
    if field:
        err["field"] = field
    return JSONResponse({"error": err}, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """Pure ASGI middleware: refuse request bodies larger than ``max_bytes`` with HTTP 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                declared = value
        if declared is not None:
            if not declared.isdigit():
                resp = _error(400, "bad_request", "Content-Length: must be a non-negative integer", "Content-Length")
                await resp(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                resp = _error(413, "payload_too_large", _too_large_message(self.max_bytes), "body")
                await resp(scope, receive, send)
                return

        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge:
            if started:
                raise
            resp = _error(413, "payload_too_large", _too_large_message(self.max_bytes), "body")
            await resp(scope, receive, send)


def _http_error_message(request: Request, exc: StarletteHTTPException) -> tuple[str, str, str | None]:
    """(type, message, field) for a framework HTTPException."""
    cause = exc.__cause__
    if exc.status_code == 404 and exc.detail == "Not Found":
        return "not_found", f"path: no such endpoint: {request.method} {request.url.path}", "path"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        msg = f"method: {request.method} is not allowed on {request.url.path}; allowed: {allowed}"
        return "method_not_allowed", msg, "method"
    if exc.status_code == 413:
        return "payload_too_large", str(exc.detail), "body"
    if exc.status_code == 400:
        if isinstance(cause, UnicodeDecodeError):
            return "bad_request", f"body: not valid UTF-8 (byte {cause.start}: {cause.reason})", "body"
        if isinstance(cause, RecursionError):
            return "bad_request", "body: JSON is nested too deeply", "body"
        detail = str(exc.detail)
        if "parsing the body" in detail:
            return "bad_request", f"body: could not be parsed ({type(cause).__name__ if cause else 'invalid'})", "body"
        return "bad_request", f"body: {detail}", "body"
    return "http_error", str(exc.detail), None


def install_security(app: FastAPI, settings: Settings) -> None:
    """Add the body limit, the rate limiter (``app.state.limiter``) and the error shaping to ``app``."""
    app.state.limiter = RateLimiter.from_settings(settings)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    @app.exception_handler(RateLimited)
    async def _rate_limited(request: Request, exc: RateLimited) -> JSONResponse:
        return _error(
            429, "RateLimited", exc.message, exc.field, headers={"Retry-After": retry_after_header(exc.retry_after_s)}
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind, message, field = _http_error_message(request, exc)
        return _error(exc.status_code, kind, message, field, headers=exc.headers)


__all__ = ["BodyLimitMiddleware", "BodyTooLarge", "install_security"]
