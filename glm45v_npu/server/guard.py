"""In front of every request, as pure ASGI middleware (Starlette's BaseHTTPMiddleware hides a client's disconnect
from the app, so a request whose client left would run on): the API key, JSON bodies only on POST (a form post
from a browser page cannot reach the API), and the body size counted as it arrives, stopping at the limit, so a
chunked body is never buffered past it. A client that leaves mid-body is not an error."""

from __future__ import annotations

import hmac
import logging

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http import error_response
from .metrics import Metrics
from .state import ServeConfig

log = logging.getLogger("glm45v_npu")


class Guard:
    def __init__(self, app: ASGIApp, config: ServeConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is None and scope["method"] == "POST":
            body = await self._body(receive)
            if body is None:  # the client left before its body arrived: nothing to answer
                log.debug("client left mid-body on %s", scope["path"])
                return
            if isinstance(body, bytes):
                receive = _replay(body, receive)
            else:
                refusal = body
        if refusal is not None:
            status, message, kind, code = refusal
            self.metrics.rejected(status)
            headers = {"Connection": "close"} if status == 413 else None  # what is left of that body is not read
            return await error_response(status, message, kind, code=code, headers=headers)(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, headers: Headers) -> tuple | None:
        key = self.config.api_key
        if key is not None and scope["path"] != "/health":
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return 401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error", \
                    "invalid_api_key"
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return 415, f"the body must be JSON (Content-Type: application/json), not {kind or 'untyped'}", \
                    "invalid_request_error", "unsupported_media_type"
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > 4 * self.config.max_body_bytes:  # not worth reading to say so
                return self._too_large()
        return None

    def _too_large(self) -> tuple:
        return 413, f"the body is over {self.config.max_body_bytes // 2**20} MiB", "invalid_request_error", \
            "body_too_large"

    async def _body(self, receive: Receive) -> bytes | tuple | None:
        """The whole body, a refusal once it passes the limit, or None when the client leaves first. Past the
        limit nothing more is kept; up to 4x the limit is read and dropped, so that a client still sending hears
        the 413 rather than a reset connection, and then the connection is closed."""
        chunks, size, limit = [], 0, self.config.max_body_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif chunks:
                chunks = []  # over the limit: what was kept goes
            more = message.get("more_body", False)
            if size > limit and (not more or size > 4 * limit):
                return self._too_large()
            if not more:
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, then the client's own channel (where a disconnect shows)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
