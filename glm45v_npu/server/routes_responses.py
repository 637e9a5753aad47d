"""POST /v1/responses (OpenAI's Responses API: stream or whole, stored for previous_response_id), GET and DELETE
/v1/responses/{id}. One implementation with the chat route: the request is run as a chat request."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ..errors import FieldError
from . import protocol as p
from . import responses as r
from .http import ApiError, error_response, final, parse, submit
from .media_policy import resolve_media
from .state import state_of
from .streaming import request_outputs

router = APIRouter()


@router.post("/v1/responses")
async def create(request: Request):
    state = state_of(request)
    req, (tool_use, params, kwargs) = await parse(request, state, r.ResponsesRequest)  # none of it reads history
    history: list[dict] = []  # the stored conversation this request continues
    if req.previous_response_id is not None:
        stored = state.responses.get(req.previous_response_id)
        if stored is None:
            raise ApiError(400, f"previous_response_id: no stored response {req.previous_response_id!r} (responses "
                           f"are kept in memory, the latest {r.STORE_RESPONSES}, and only with store: true)",
                           param="previous_response_id", code="previous_response_not_found")
        history = stored[1]
    chat, new, where = await asyncio.to_thread(req.chat, history)
    offset = len(chat.messages) - len(new)
    try:
        new = await resolve_media(new, state.config.media)
    except FieldError as e:  # named as the input item it came from
        raise r.errors_named(e, where) from None
    messages = [*chat.messages[:offset], *new]
    engine_request = {"messages": messages, "chat_template_kwargs": kwargs}
    if tool_use is not None:
        engine_request["tools"] = tool_use.raw
    rid, outputs = await submit(state, engine_request, params, request)
    run = Run(state, req, history + new, tool_use)
    if req.stream:
        return StreamingResponse(run.events(rid, outputs), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    out = await final(request, state, rid, outputs)
    if out is None:
        return Response(status_code=499)
    run.items.feed(run.choice.feed(out.outputs[0].text, final=True, image_sizes=out.image_sizes))
    run.items.close()
    return run.finish(out, out.outputs[0].token_ids)


class Run:
    """One response being made: its items as they stream, then the response object, stored when asked."""

    def __init__(self, state, req: r.ResponsesRequest, conversation: list[dict], tool_use):
        self.state, self.req, self.conversation = state, req, conversation
        self.choice = p.ChatChoice(tool_use)
        self.items = r.Items()
        self.id, self.made = p.new_id("resp"), r.now()
        tokenizer = state.llm.engine.processor.tokenizer
        self.think_end = tokenizer.convert_tokens_to_ids("</think>") if tokenizer is not None else None

    def response(self, status: str, out=None, token_ids=(), incomplete: str | None = None,
                 error: dict | None = None) -> dict:
        usage = None
        if out is not None:
            ids = list(token_ids)
            reasoning = ids.index(self.think_end) + 1 if self.think_end in ids else 0
            usage = r.usage(out, reasoning)
        return r.response_object(self.req, self.id, self.made, self.state.config.model_name, self.items.items, status,
                                 usage, incomplete, error)

    def finish(self, out, token_ids) -> dict:
        reason = out.outputs[0].finish_reason
        incomplete = "max_output_tokens" if reason == "length" else None
        body = self.response("incomplete" if incomplete else "completed", out, token_ids, incomplete)
        if self.req.store:
            self.state.responses.put(body, self.conversation + r.as_messages(self.items.items))
        return body

    async def events(self, rid: str, outputs: asyncio.Queue):
        def sse(event: dict) -> str:
            return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

        yield sse(self.items.event("response.created", response=self.response("in_progress")))
        yield sse(self.items.event("response.in_progress", response=self.response("in_progress")))
        token_ids: list[int] = []
        async for item in request_outputs(self.state.engine, rid, outputs):
            if isinstance(item, Exception) or item.error:
                message = str(item) if isinstance(item, Exception) else item.error
                for event in self.items.close():
                    yield sse(event)
                yield sse(self.items.event("response.failed", response=self.response(
                    "failed", error={"code": "server_error", "message": message})))
                return
            c = item.outputs[0] if item.outputs else None
            if c is None:
                continue
            token_ids += c.token_ids
            done = c.finish_reason is not None
            for event in self.items.feed(self.choice.feed(c.text, final=done, image_sizes=item.image_sizes)):
                yield sse(event)
            if done:
                for event in self.items.close():
                    yield sse(event)
                body = self.finish(item, token_ids)
                kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
                yield sse(self.items.event(kind, response=body))


@router.get("/v1/responses/{response_id}")
async def retrieve(request: Request, response_id: str):
    stored = state_of(request).responses.get(response_id)
    if stored is None:
        return error_response(404, f"no stored response {response_id!r}", param="response_id")
    return stored[0]


@router.delete("/v1/responses/{response_id}")
async def delete(request: Request, response_id: str):
    if not state_of(request).responses.delete(response_id):
        return error_response(404, f"no stored response {response_id!r}", param="response_id")
    return {"id": response_id, "object": "response.deleted", "deleted": True}
