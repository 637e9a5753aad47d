"""POST /v1/completions: one prompt (text or token ids), streamed or whole."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from . import protocol as p
from .http import ApiError, final, parse, submit
from .state import state_of
from .streaming import completion_stream, sse

router = APIRouter()


@router.post("/v1/completions")
async def completions(request: Request):
    state = state_of(request)
    req, params = await parse(request, state, p.CompletionRequest)
    prompts = req.prompts()
    if len(prompts) != 1:
        raise ApiError(400, "one prompt per request (send several requests, or use n)", param="prompt")
    rid, outputs = await submit(state, prompts[0], params, request)
    cid, made, name = p.new_id("cmpl"), p.created(), state.config.model_name
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse(completion_stream(state.engine, rid, outputs, cid, made, name, include_usage))
    out = await final(request, state, rid, outputs)
    if out is None:
        return Response(status_code=499)
    return p.completion_response(out, cid, made, name)
