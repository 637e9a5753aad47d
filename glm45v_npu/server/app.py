"""The OpenAI-compatible HTTP API over one LLM: /v1/chat/completions, /v1/completions, /v1/models, /health,
/metrics. Every error is OpenAI's body {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status,
never a traceback; a client that goes away has its request aborted within one engine step.

build_app wires the rooms together: the state every route shares (state.py), the guard in front of every
request, the error handlers (http.py) and one router per endpoint group (routes_*.py)."""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from . import routes_chat, routes_completions, routes_info
from .engine_loop import EngineLoop
from .http import error_response, install_error_handlers
from .metrics import Metrics
from .state import ServeConfig, ServerState


def build_app(llm, config: ServeConfig) -> FastAPI:
    metrics = Metrics()
    engine = EngineLoop(llm, config.max_waiting, on_output=metrics.on_output, on_step=metrics.on_step)
    state = ServerState(llm, config, metrics, engine, dict(llm.engine.sampling_defaults))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="glm45v-npu", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server, app.state.engine = state, engine

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

    install_error_handlers(app, metrics)
    for router in (routes_info.router, routes_chat.router, routes_completions.router):
        app.include_router(router)
    return app
