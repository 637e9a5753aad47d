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


def _model_card(state) -> dict:
    return {"id": state.config.model_name, "object": "model", "created": p.created(), "owned_by": "glm45v-npu",
            "max_model_len": state.llm.engine.max_model_len}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [_model_card(state_of(request))]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    state = state_of(request)
    if model_id != state.config.model_name:
        return error_response(404, f"model {model_id!r} is not served here (this server serves "
                              f"{state.config.model_name!r})", param="model", code="model_not_found")
    return _model_card(state)
