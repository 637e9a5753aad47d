"""POST /v1/completions: one prompt (text or token ids), streamed or whole; echo puts the prompt (and with
logprobs, its tokens' logprobs) before the completion, as lm-evaluation-harness's log-likelihood tasks need."""

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
    tokenizer = state.llm.engine.processor.tokenizer
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        echo = (lambda out: _echo(out, tokenizer).text) if req.echo else None
        return sse(completion_stream(state.engine, rid, outputs, cid, made, name, include_usage, echo))
    out = await final(request, state, rid, outputs)
    if out is None:
        return Response(status_code=499)
    return p.completion_response(out, cid, made, name, _echo(out, tokenizer) if req.echo else None,
                                 req.prompt_logprobs is not None)


def _echo(out, tokenizer) -> p.Echo:
    ids = out.prompt_token_ids
    decode = (lambda t: tokenizer.decode(t)) if tokenizer is not None else (lambda t: "")
    text = out.prompt if out.prompt is not None else decode(ids)
    return p.Echo(text, ids, out.prompt_logprobs or [None] * len(ids), decode(ids[:1]))
