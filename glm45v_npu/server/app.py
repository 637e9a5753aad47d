"""The OpenAI-compatible HTTP API over one LLM: /v1/chat/completions, /v1/responses, /v1/completions, /v1/models, /health,
/metrics, and the chat page at / (unless --no-ui). Every error is OpenAI's body {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status,
never a traceback; a client that goes away has its request aborted within one engine step.

build_app wires the rooms together: the state every route shares (state.py), the guard in front of every
request (guard.py), the error handlers (http.py) and one router per endpoint group (routes_*.py)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ..sampling_params import StructuredOutputsParams, schema_checks_apart
from . import body_check, routes_chat, routes_completions, routes_info, routes_responses
from .engine_loop import EngineLoop
from .guard import Guard
from .http import install_error_handlers
from .metrics import Metrics
from .state import ServeConfig, ServerState


def _checks_apart() -> None:
    """JSON schemas and large bodies are checked in processes of their own from now on: started here."""
    schema_checks_apart()
    StructuredOutputsParams(json={"type": "object"})
    body_check.warm()


def build_app(llm, config: ServeConfig) -> FastAPI:
    metrics = Metrics()
    engine = EngineLoop(llm, config.max_waiting, on_output=metrics.on_output, on_step=metrics.on_step)
    state = ServerState(llm, config, metrics, engine, dict(llm.engine.sampling_defaults))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(_checks_apart)
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)
        body_check.close()
        schema_checks_apart(on=False)

    app = FastAPI(title="glm45v-npu", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server, app.state.engine = state, engine

    app.add_middleware(Guard, config=config, metrics=metrics)
    if config.allowed_origins:  # outside the guard: a browser's preflight carries no API key
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], max_age=600)
    install_error_handlers(app, metrics)
    for router in (routes_info.router, routes_chat.router, routes_completions.router, routes_responses.router):
        app.include_router(router)
    if config.ui:
        from . import routes_ui

        app.include_router(routes_ui.router)
    return app
