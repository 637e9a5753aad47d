"""POST /v1/chat/completions: messages with images and videos, streamed or whole, reasoning split out, tool calls
parsed, answers held to a grammar (response_format, tool_choice required or named, vLLM's structured_outputs)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from . import protocol as p
from .http import final, parse, submit
from .media_policy import resolve_media
from .state import state_of
from .streaming import chat_stream, sse

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = state_of(request)
    req, (tool_use, params, kwargs) = await parse(request, state, p.ChatCompletionRequest)
    messages = await resolve_media(req.messages, state.config.media)
    engine_request = {"messages": messages, "chat_template_kwargs": kwargs}
    if tool_use is not None:
        engine_request["tools"] = tool_use.raw
    rid, outputs = await submit(state, engine_request, params, request)
    cid, made, name = p.new_id("chatcmpl"), p.created(), state.config.model_name
    top_n = req.top_logprobs or 0
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse(chat_stream(state.engine, rid, outputs, cid, made, name, req.n, top_n, include_usage, tool_use))
    out = await final(request, state, rid, outputs)
    if out is None:
        return Response(status_code=499)
    return p.chat_response(out, cid, made, name, top_n, tool_use)
