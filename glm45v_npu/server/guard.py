"""In front of every request, as pure ASGI middleware (Starlette's BaseHTTPMiddleware hides a client's disconnect
from the app, so a request whose client left would run on): the API key, JSON bodies only on POST (a form post
from a browser page cannot reach the API), the body size counted as it arrives, stopping at the limit, so a
chunked body is never read past it, and a write timeout: a client that reads nothing of its response for
write_timeout_s is dropped (its request aborted, its connection closed). A client that leaves mid-body is not an
error."""

from __future__ import annotations

import asyncio
import hmac
import logging

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http import ONCE, error_response
from .metrics import Metrics
from .state import ServeConfig

log = logging.getLogger("glm45v_npu")


DISCARD_S = 5.0  # what dropping an over-limit body before its 413 may take


class SlowClient(Exception):
    """A response part waited longer than the write timeout for its client to read."""


class Guard:
    def __init__(self, app: ASGIApp, config: ServeConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None and refusal[0] == 413:  # declared too large
            await self._discard_declared(headers, receive)
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
        timeout = self.config.write_timeout_s

        async def send_in_time(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), timeout)
            except asyncio.TimeoutError:
                raise SlowClient from None

        try:
            await self.app(scope, receive, send_in_time)
        except SlowClient:  # the stream ends (its request is aborted), and the server closes the connection
            ONCE.log("slow client", f"a client read nothing for {timeout:.0f} s on {scope['path']}; dropped",
                     level=logging.WARNING)


    def _refusal(self, scope: Scope, headers: Headers) -> tuple | None:
        key = self.config.api_key
        if key is not None and not self._public(scope):
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
            if length.isdigit() and int(length) > self.config.max_body_bytes:  # not worth reading to say so
                return self._too_large()
        return None

    def _public(self, scope: Scope) -> bool:
        """/health, and with the chat page its page and assets (what it asks of the server needs the key)."""
        path = scope["path"]
        return path == "/health" or (self.config.ui and scope["method"] in ("GET", "HEAD")
                                     and (path == "/" or path.startswith("/ui/static/")))

    async def _discard_declared(self, headers: Headers, receive: Receive) -> None:
        """A body declared at most twice the limit is read and dropped (none of it kept, for at most DISCARD_S)
        before the 413: a client still sending when the server closes gets a reset instead of the answer. A larger
        declared body is not read at all."""
        length = int(headers.get("content-length", "0") or 0)
        if length > 2 * self.config.max_body_bytes:
            return

        async def drain() -> None:
            while (await receive()).get("more_body", False):
                pass

        try:
            await asyncio.wait_for(drain(), DISCARD_S)
        except asyncio.TimeoutError:
            pass

    def _too_large(self) -> tuple:
        return 413, f"the body is over {self.config.max_body_bytes // 2**20} MiB", "invalid_request_error", \
            "body_too_large"

    async def _body(self, receive: Receive) -> bytes | tuple | None:
        """The whole body, a refusal the moment it passes the limit (nothing more is read: the 413 goes out with
        Connection: close), or None when the client leaves first."""
        chunks, size, limit = [], 0, self.config.max_body_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
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
