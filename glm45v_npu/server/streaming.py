"""Server-sent event streams of chat and completion chunks: one chunk per choice per engine step, a usage chunk
when asked, then [DONE] (or an error chunk). A consumer that stops early aborts its request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from . import protocol as p
from .engine_loop import EngineLoop


def sse(chunks: AsyncIterator[dict | str]) -> StreamingResponse:
    async def lines():
        async for chunk in chunks:
            yield f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def request_outputs(engine: EngineLoop, rid: str, outputs: asyncio.Queue):
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
    async for item in request_outputs(engine, rid, outputs):
        if isinstance(item, Exception) or item.error:
            message = str(item) if isinstance(item, Exception) else item.error
            yield {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
            return
        last = item
        for choice in choices(item):
            yield {**head, "choices": [choice]}
    if include_usage and last is not None:
        yield {**head, "choices": [], "usage": p.usage(last)}
    yield "[DONE]"


async def chat_stream(engine, rid, outputs, cid, made, model, n, top_n, include_usage, tool_use=None):
    head = {"id": cid, "object": "chat.completion.chunk", "created": made, "model": model}
    streams = [p.ChatChoice(tool_use) for _ in range(n)]
    for i in range(n):
        yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}

    def choices(item):
        for c in item.outputs:
            stream = streams[c.index]
            delta = stream.feed(c.text, final=c.finish_reason is not None, image_sizes=item.image_sizes)
            logprobs = p.chat_logprobs(c, top_n) if c.token_ids else None
            if delta or logprobs or c.finish_reason:
                yield {"index": c.index, "delta": delta, "logprobs": logprobs,
                       "finish_reason": stream.finish_reason(c.finish_reason)}

    async for chunk in _chunks(engine, rid, outputs, head, include_usage, choices):
        yield chunk


def completion_stream(engine, rid, outputs, cid, made, model, include_usage, echo=None):
    """`echo(output)`: the prompt's text, sent before each choice's first text."""
    head = {"id": cid, "object": "text_completion", "created": made, "model": model}
    echoed: set[int] = set()

    def choices(item):
        out = []
        for c in item.outputs:
            before = echo(item) if echo is not None and c.index not in echoed else ""
            echoed.add(c.index)
            out.append({"index": c.index, "text": before + c.text, "logprobs": p.completion_logprobs(c),
                        "finish_reason": c.finish_reason})
        return out

    return _chunks(engine, rid, outputs, head, include_usage, choices)
