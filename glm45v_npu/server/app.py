"""The OpenAI-compatible HTTP API over one LLM: /v1/chat/completions, /v1/completions, /v1/models, /health,
/metrics. Every error is OpenAI's body {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status,
never a traceback; a client that goes away has its request aborted within one engine step."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..answer import ReasoningStream, split_reasoning
from ..errors import FieldError, Glm45vError
from . import protocol as p
from .engine_loop import EngineLoop, Overloaded
from .media import MediaPolicy, resolve_url
from .metrics import Metrics

log = logging.getLogger("glm45v_npu")


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_waiting: int | None = None
    max_body_bytes: int = 64 * 2**20
    media: MediaPolicy = field(default_factory=MediaPolicy)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def build_app(llm, config: ServeConfig) -> FastAPI:
    metrics = Metrics()
    engine = EngineLoop(llm, config.max_waiting, on_output=metrics.on_output, on_step=metrics.on_step)
    defaults = dict(llm.engine.sampling_defaults)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="glm45v-npu", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics, app.state.llm = engine, metrics, llm

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if config.api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), config.api_key.encode()):
                metrics.rejected(401)
                return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                      "authentication_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            metrics.rejected(413)
            return error_response(413, f"the body is over {config.max_body_bytes // 2**20} MiB", code="body_too_large")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        metrics.rejected(e.status)
        return error_response(e.status, e.message, e.kind, e.param, e.code, e.headers)

    @app.exception_handler(Glm45vError)
    async def bad_request(request: Request, e: Glm45vError):
        """A request the engine or the protocol refuses: 400, naming the field when one is at fault."""
        metrics.rejected(400)
        return error_response(400, str(e), param=e.field if isinstance(e, FieldError) else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return error_response(400, str(e), param=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else
                              "server_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("internal error")
        return error_response(500, f"internal error ({type(e).__name__})", "server_error")

    async def parse(request: Request, model: type[p._Sampling]) -> Any:
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise ApiError(413, f"the body is over {config.max_body_bytes // 2**20} MiB", code="body_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = _param(first["loc"])
            raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
        if req.model is not None and req.model != config.model_name:
            raise ApiError(400, f"model {req.model!r} is not served here (this server serves {config.model_name!r})",
                           param="model", code="model_not_found")
        bad = req.unsupported()
        if bad:
            raise ApiError(400, f"{bad} is not supported by this server", param=bad)
        return req

    async def submit(request: Any, params: Any) -> tuple[str, asyncio.Queue]:
        try:
            return await engine.submit(request, params, None)
        except Overloaded as e:
            raise ApiError(503, str(e), "server_error", code="overloaded", headers={"Retry-After": "1"}) from None

    async def final(request: Request, rid: str, outputs: asyncio.Queue):
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
                    return task.result()
                except Glm45vError as e:
                    raise ApiError(500, str(e), "server_error") from None
            if await request.is_disconnected():
                engine.abort(rid)
                task.cancel()
                return None

    # --- endpoints --------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not engine.thread.is_alive():
            return error_response(503, "the engine is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": p.created(),
                                            "owned_by": "glm45v-npu", "max_model_len": llm.engine.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: p.ChatCompletionRequest = await parse(request, p.ChatCompletionRequest)
        params = req.params(defaults)
        messages = await _resolve_media(req.messages, config.media)
        engine_request = {"messages": messages, "chat_template_kwargs": dict(req.chat_template_kwargs or {})}
        rid, outputs = await submit(engine_request, params)
        cid, made = p.new_id("chatcmpl"), p.created()
        top_n = req.top_logprobs or 0
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_chat_stream(engine, rid, outputs, cid, made, config.model_name, req.n, top_n, include_usage))
        out = await final(request, rid, outputs)
        if out is None:
            return Response(status_code=499)
        choices = []
        for c in out.outputs:
            reasoning, content = split_reasoning(c.text)
            choices.append({"index": c.index, "message": {"role": "assistant", "content": content,
                                                          "reasoning_content": reasoning or None},
                            "logprobs": p.chat_logprobs(c, top_n), "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason})
        return {"id": cid, "object": "chat.completion", "created": made, "model": config.model_name,
                "choices": choices, "usage": p.usage(out)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: p.CompletionRequest = await parse(request, p.CompletionRequest)
        params = req.params(defaults)
        prompts = req.prompts()
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request (send several requests, or use n)", param="prompt")
        rid, outputs = await submit(prompts[0], params)
        cid, made = p.new_id("cmpl"), p.created()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_completion_stream(engine, rid, outputs, cid, made, config.model_name, include_usage))
        out = await final(request, rid, outputs)
        if out is None:
            return Response(status_code=499)
        choices = [{"index": c.index, "text": c.text, "logprobs": p.completion_logprobs(c),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
        return {"id": cid, "object": "text_completion", "created": made, "model": config.model_name,
                "choices": choices, "usage": p.usage(out)}

    return app


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param(loc: tuple) -> str:
    """pydantic's error location as the request field (without the type tags it adds for unions)."""
    parts = []
    for x in loc:
        if isinstance(x, str) and (x in _TYPE_TAGS or "[" in x):
            break
        parts.append(f"[{x}]" if isinstance(x, int) else ("." if parts else "") + str(x))
    return "".join(parts)


async def _resolve_media(messages: list[dict], policy: MediaPolicy) -> list[dict]:
    """image_url and video_url parts -> image and video parts whose source the processor may read (media.py)."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image_url", "video_url"):
                    url = part.get(kind)
                    url = url.get("url") if isinstance(url, dict) else url
                    source = await resolve_url(url, policy, f"messages[{i}].content[{j}].{kind}")
                    media = kind.removesuffix("_url")
                    parts.append({"type": media, media: source})
                else:
                    parts.append(part)
            m = {**m, "content": parts}
        out.append(m)
    return out


def _sse(chunks: AsyncIterator[dict | str]) -> StreamingResponse:
    async def lines():
        async for chunk in chunks:
            yield f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _stream(engine: EngineLoop, rid: str, outputs: asyncio.Queue):
    """The request's delta outputs until it finishes; if the consumer stops early, the request is aborted."""
    done = False
    try:
        while True:
            item = await outputs.get()
            if item is None:
                done = True
                return
            if isinstance(item, Exception):
                done = True
                yield item
                return
            yield item
    finally:
        if not done:
            engine.abort(rid)


async def _chunks(engine, rid, outputs, head, include_usage, choices):
    """Stream chunks: `choices(output)` per engine step, a usage chunk if asked, then [DONE] (or an error chunk)."""
    last = None
    async for item in _stream(engine, rid, outputs):
        if isinstance(item, Exception):
            yield {"error": {"message": str(item), "type": "server_error", "param": None, "code": None}}
            return
        last = item
        for choice in choices(item):
            yield {**head, "choices": [choice]}
    if include_usage and last is not None:
        yield {**head, "choices": [], "usage": p.usage(last)}
    yield "[DONE]"


async def _chat_stream(engine, rid, outputs, cid, made, model, n, top_n, include_usage):
    head = {"id": cid, "object": "chat.completion.chunk", "created": made, "model": model}
    streams = [ReasoningStream() for _ in range(n)]
    for i in range(n):
        yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}

    def choices(item):
        for c in item.outputs:
            reasoning, content = streams[c.index].feed(c.text)
            if c.finish_reason is not None:
                r2, c2 = streams[c.index].flush()
                reasoning, content = reasoning + r2, content + c2
            delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}
            logprobs = p.chat_logprobs(c, top_n) if c.token_ids else None
            if delta or logprobs or c.finish_reason:
                yield {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": c.finish_reason}

    async for chunk in _chunks(engine, rid, outputs, head, include_usage, choices):
        yield chunk


def _completion_stream(engine, rid, outputs, cid, made, model, include_usage):
    head = {"id": cid, "object": "text_completion", "created": made, "model": model}

    def choices(item):
        return [{"index": c.index, "text": c.text, "logprobs": p.completion_logprobs(c),
                 "finish_reason": c.finish_reason} for c in item.outputs]

    return _chunks(engine, rid, outputs, head, include_usage, choices)
