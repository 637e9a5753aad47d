"""GET endpoints: /health (503 when the engine cannot serve), /metrics (Prometheus), /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from . import protocol as p
from .http import error_response
from .state import state_of

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    engine = state_of(request).engine
    if not engine.healthy:
        return error_response(503, f"the engine cannot serve: {engine.broken or 'its thread has stopped'}",
                              "server_error")
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus(request: Request):
    return Response(state_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request):
    state = state_of(request)
    return {"object": "list", "data": [{"id": state.config.model_name, "object": "model", "created": p.created(),
                                        "owned_by": "glm45v-npu", "max_model_len": state.llm.engine.max_model_len}]}
