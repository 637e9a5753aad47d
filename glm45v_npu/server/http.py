"""The HTTP side every endpoint shares: OpenAI error bodies, reading and validating a JSON body, submitting to the
engine loop, and waiting for a finished output while watching for the client to leave."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import FieldError, Glm45vError
from . import body_check
from .body_check import ApiError
from .engine_loop import Overloaded, Unavailable
from .metrics import Metrics
from .state import ServerState

log = logging.getLogger("glm45v_npu")


class Once:
    """Errors a client can cause, logged once per kind (the first with its traceback) and then counted, with a
    line at each power of ten: a flood of bad requests cannot fill the disk."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, kind: str, message: str, exc_info: bool = False, level: int = logging.ERROR) -> None:
        with self._lock:
            n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n == 1:
            log.log(level, "%s (further ones are counted, not logged)", message, exc_info=exc_info)
        elif n >= 10 and str(n).rstrip("0") == "1":  # 10, 100, 1000, ...
            log.log(level, "%s: %d so far", kind, n)


ONCE = Once()


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every failure as OpenAI's error body, never a traceback."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        metrics.rejected(e.status)
        return error_response(e.status, e.message, e.kind, e.param, e.code, e.headers)

    @app.exception_handler(Glm45vError)
    async def bad_request(request: Request, e: Glm45vError):
        """A request the engine or the protocol refuses: 400, naming the field when one is at fault."""
        metrics.rejected(400)
        return error_response(400, str(e), param=e.field if isinstance(e, FieldError) else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else
                              "server_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        if isinstance(e, RecursionError):  # nesting in the request's content deeper than the code walking it
            metrics.rejected(400)
            ONCE.log("RecursionError", f"a request nested too deeply for {request.url.path}", level=logging.WARNING)
            return error_response(400, "the request nests too deeply to be read")
        ONCE.log(f"internal error {type(e).__name__}", f"internal error on {request.url.path}", exc_info=True)
        return error_response(500, f"internal error ({type(e).__name__})", "server_error")


async def parse(request: Request, state: ServerState, model: type[BaseModel]) -> tuple[Any, Any]:
    """The body (the guard has checked its size and type) as `model` and what its route needs from it (sampling
    parameters, tools), or an ApiError that names the field at fault. A large body is first read and checked in a
    process of its own: decoding a few MB of JSON holds the interpreter lock, and every stream waits on it."""
    body = await request.body()
    name = state.config.model_name
    if len(body) > body_check.APART_BYTES:
        refusal = await asyncio.to_thread(body_check.apart, body, name, model, state.defaults, state.max_model_len)
        if refusal is not None:
            raise ApiError(*refusal)
    req = await asyncio.to_thread(body_check.validated, body, name, model)
    return req, await asyncio.to_thread(req.prepared, state.defaults, state.max_model_len)


async def submit(state: ServerState, request: Any, params: Any, client: Request | None = None
                 ) -> tuple[str, asyncio.Queue]:
    """Encode and queue the request; while it is being encoded, a client that leaves cancels its media work."""
    cancel = threading.Event()

    async def watch():
        while not cancel.is_set():
            if client is not None and await client.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        return await state.engine.submit(request, params, None, cancel)
    except Overloaded as e:
        raise ApiError(503, str(e), "server_error", code="overloaded", headers={"Retry-After": "1"}) from None
    except Unavailable as e:
        raise ApiError(503, f"the engine cannot serve: {e}", "server_error", code="unavailable") from None
    finally:
        watcher.cancel()


async def final(request: Request, state: ServerState, rid: str, outputs: asyncio.Queue):
    """The finished output, or None when the client left first (its request is then aborted)."""
    async def wait():
        while True:
            item = await outputs.get()
            if isinstance(item, Exception):
                raise item
            if item is not None and item.finished:
                return item

    task = asyncio.create_task(wait())
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            try:
                out = task.result()
            except Glm45vError as e:
                raise ApiError(500, str(e), "server_error") from None
            if out.error:
                raise ApiError(500, out.error, "server_error")
            return out
        if await request.is_disconnected():
            state.engine.abort(rid)
            task.cancel()
            return None
