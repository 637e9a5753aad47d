"""OpenAI's Responses API (POST /v1/responses) as a second wire format over the chat path: a request becomes a
ChatCompletionRequest (the same encoding, grammar, tool parsing and media policy), and the chat path's message
pieces become Responses output items and their typed stream events. Stored responses (previous_response_id) are
kept in memory, bounded."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..errors import FieldError
from . import protocol as p

# stored responses (README): at most this many, and this many bytes of conversation (JSON) in all; oldest go first
STORE_RESPONSES = 1024
STORE_BYTES = 256 * 2**20
PART_TYPES = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "text",
              "input_image": "image_url"}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None  # extensions, as on the chat path
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_token_budget: int | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None

    def unsupported(self) -> str | None:
        return None

    def chat(self, history: list[dict] | None = None) -> tuple[p.ChatCompletionRequest, list[dict], list[str]]:
        """-> the chat request (instructions first, then the stored conversation, then this input), the new input
        as messages, and for each of those the input field it came from (for errors). Without a history (None) the
        call ids of function_call_output items are not checked: the stored conversation is not known yet."""
        known_calls = None if history is None else {c["id"] for m in history for c in m.get("tool_calls") or []}
        messages, where = input_messages(self.input, known_calls)
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        fmt = (self.text or {}).get("format")
        effort = (self.reasoning or {}).get("effort")
        body = {"model": self.model, "messages": [*system, *(history or []), *messages] or [{"role": "user",
                                                                                             "content": ""}],
                "tools": chat_tools(self.tools), "tool_choice": chat_tool_choice(self.tool_choice),
                "parallel_tool_calls": self.parallel_tool_calls, "response_format": chat_format(fmt),
                "reasoning_effort": effort, "max_tokens": self.max_output_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "chat_template_kwargs": self.chat_template_kwargs,
                "thinking_token_budget": self.thinking_token_budget, "stream": self.stream}
        return p.ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None}), messages, where

    def prepared(self, defaults: dict, max_model_len: int):
        """Tools, sampling parameters and template arguments, checked as the chat path checks them; none of them
        depends on the stored conversation, which the route adds to the messages."""
        chat, _, _ = self.chat()
        return chat.prepared(defaults, max_model_len)


def input_messages(given: str | list, known_calls: set[str] | None) -> tuple[list[dict], list[str]]:
    """Responses input (text, or items: messages, function_call, function_call_output, reasoning) -> chat
    messages, and the input field each came from; an item the server does not take is named."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}], ["input"]
    messages: list[dict] = []
    where: list[str] = []
    for i, item in enumerate(given):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise FieldError("", at, type(item).__name__, "expected an object (a message or an item with a type)")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, at))
        elif kind == "function_call":
            call = _function_call(item, at)
            if known_calls is not None:
                known_calls.add(call["id"])
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and where[-1].startswith("calls"):
                last["tool_calls"].append(call)
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            where.append(f"calls at {at}")
            continue
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if known_calls is not None and call_id not in known_calls:
                raise FieldError("", f"{at}.call_id", call_id, "no function_call with this call_id comes before it "
                                 "(in the input or the previous response)")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _output_text(item.get("output"),
                                                                                               f"{at}.output")})
        elif kind == "reasoning":  # earlier reasoning, sent back by agent frameworks: the template drops it
            continue
        else:
            raise FieldError("", f"{at}.type", kind, "expected message, function_call, function_call_output or "
                             "reasoning")
        where.append(at)
    return messages, where


def _message(item: dict, at: str) -> dict:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise FieldError("", f"{at}.role", role, "expected user, system, developer or assistant")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise FieldError("", f"{at}.content", content, "expected a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES:
            raise FieldError("", f"{at}.content[{j}].type", kind, f"expected one of {', '.join(PART_TYPES)}")
        if PART_TYPES[kind] == "text":
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise FieldError("", f"{at}.content[{j}].text", text, "expected a string")
            parts.append({"type": "text", "text": text})
        else:
            url = part.get("image_url")
            if not isinstance(url, str):
                raise FieldError("", f"{at}.content[{j}].image_url", url if "file_id" not in part else "file_id",
                                 "expected the image as a URL or a data: URI (file ids are not kept here)")
            parts.append({"type": "image_url", "image_url": {"url": url}})
    return {"role": role, "content": parts}


def _function_call(item: dict, at: str) -> dict:
    for name in ("call_id", "name", "arguments"):
        if not isinstance(item.get(name), str):
            raise FieldError("", f"{at}.{name}", item.get(name), "expected a string")
    return {"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                    "arguments": item["arguments"]}}


def _output_text(output: Any, at: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "".join(part.get("text", "") for part in output if isinstance(part, dict))
    raise FieldError("", at, output, "expected a string or a list of text parts")


def chat_tools(tools: list | None) -> list | None:
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise FieldError("", f"tools[{i}].type", tool.get("type") if isinstance(tool, dict) else tool,
                             "only function tools are served here")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out or None


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise FieldError("", "tool_choice", choice, "expected none, auto, required or {'type': 'function', "
                             "'name': ...}")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def chat_format(fmt: Any) -> Any:
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_schema", "json_schema": {k: fmt.get(k) for k in ("name", "schema", "strict")}}


def errors_named(e: FieldError, where: list[str]) -> FieldError:
    """An error about the input's messages[k] renamed to the input field that message came from."""
    m = re.match(r"messages\[(\d+)\](.*)", e.field or "")
    k = int(m.group(1)) if m else -1
    if not m or not 0 <= k < len(where):
        return e
    field = where[k].removeprefix("calls at ") + m.group(2)
    return FieldError("", field, e.value, e.why)


class Items:
    """The chat path's message pieces (ChatChoice deltas) -> output items and their stream events, as they come:
    a reasoning item, a message (whitespace alone never opens one) and one function_call item per call."""

    def __init__(self):
        self.items: list[dict] = []
        self.open: dict | None = None
        self.blank = ""
        self.seq = 0
        self.calls: dict[int, dict] = {}

    def event(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def feed(self, delta: dict) -> list[dict]:
        out = []
        if delta.get("reasoning_content"):
            out += self._reasoning(delta["reasoning_content"])
        if delta.get("content"):
            out += self._text(delta["content"])
        for call in delta.get("tool_calls", []):
            out += self._call(call)
        if delta.get("boxes"):
            message = next((i for i in reversed(self.items) if i["type"] == "message"), None)
            if message is not None:
                message["boxes"] = delta["boxes"]
        return out

    def close(self) -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        k = self.items.index(item)
        item["status"] = "completed"
        head = {"item_id": item["id"], "output_index": k}
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            done = [self.event("response.reasoning_text.done", **head, content_index=0, text=text)]
        elif item["type"] == "message":
            part = item["content"][0]
            done = [self.event("response.output_text.done", **head, content_index=0, text=part["text"], logprobs=[]),
                    self.event("response.content_part.done", **head, content_index=0, part=part)]
        else:
            done = [self.event("response.function_call_arguments.done", **head, arguments=item["arguments"],
                               name=item["name"])]
        return done + [self.event("response.output_item.done", output_index=k, item=item)]

    def _start(self, item: dict) -> list[dict]:
        out = self.close()
        self.items.append(item)
        self.open = item
        shown = {**item, "content": []} if "content" in item else dict(item)
        return out + [self.event("response.output_item.added", output_index=len(self.items) - 1, item=shown)]

    def _head(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1}

    def _reasoning(self, text: str) -> list[dict]:
        out = []
        if self.open is None or self.open["type"] != "reasoning":
            out += self._start({"type": "reasoning", "id": p.new_id("rs"), "summary": [], "status": "in_progress",
                                "content": [{"type": "reasoning_text", "text": ""}]})
        self.open["content"][0]["text"] += text
        return out + [self.event("response.reasoning_text.delta", **self._head(), content_index=0, delta=text)]

    def _text(self, text: str) -> list[dict]:
        out = []
        if self.open is None or self.open["type"] != "message":
            if not (self.blank + text).strip():
                self.blank += text
                return []
            text, self.blank = self.blank + text, ""
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out += self._start({"type": "message", "id": p.new_id("msg"), "status": "in_progress",
                                "role": "assistant", "content": [part]})
            out.append(self.event("response.content_part.added", **self._head(), content_index=0,
                                  part={**part, "text": ""}))
        self.open["content"][0]["text"] += text
        return out + [self.event("response.output_text.delta", **self._head(), content_index=0, delta=text,
                                 logprobs=[])]

    def _call(self, call: dict) -> list[dict]:
        out = []
        if call.get("id"):
            item = {"type": "function_call", "id": p.new_id("fc"), "call_id": call["id"],
                    "name": call["function"]["name"], "arguments": "", "status": "in_progress"}
            out += self._start(item)
            self.calls[call["index"]] = item
        item = self.calls[call["index"]]
        delta = call["function"].get("arguments", "")
        if not delta:
            return out
        item["arguments"] += delta
        k = self.items.index(item)
        return out + [self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=k,
                                 delta=delta)]


def usage(out, reasoning_tokens: int) -> dict:
    u = p.usage(out)
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": u["total_tokens"]}


def response_object(req: ResponsesRequest, rid: str, made: float, model: str, items: list[dict], status: str,
                    usage_: dict | None, incomplete: str | None = None, error: dict | None = None) -> dict:
    return {"id": rid, "object": "response", "created_at": made, "model": model, "status": status,
            "output": items, "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None}, "store": req.store,
            "temperature": req.temperature, "top_p": req.top_p, "text": req.text or {"format": {"type": "text"}},
            "tool_choice": req.tool_choice or "auto", "tools": req.tools or [], "truncation": "disabled",
            "metadata": req.metadata or {}, "user": req.user, "usage": usage_}


def as_messages(items: list[dict]) -> list[dict]:
    """A response's output as chat messages, for the conversation a later previous_response_id continues."""
    content = "".join(i["content"][0]["text"] for i in items if i["type"] == "message")
    calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in items if i["type"] == "function_call"]
    message: dict = {"role": "assistant", "content": content or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return [message]


class ResponseStore:
    """Stored responses and the conversation each ends (its input and output as chat messages, instructions
    aside: OpenAI does not carry them over), least recently used first out past the bounds."""

    def __init__(self, most: int = STORE_RESPONSES, most_bytes: int = STORE_BYTES):
        self.most, self.most_bytes = most, most_bytes
        self.entries: OrderedDict[str, tuple[dict, list[dict], int]] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def put(self, response: dict, conversation: list[dict]) -> None:
        size = len(json.dumps(conversation, default=str)) + len(json.dumps(response, default=str))
        with self.lock:
            self.entries[response["id"]] = (response, conversation, size)
            self.bytes += size
            while self.entries and (len(self.entries) > self.most or self.bytes > self.most_bytes):
                _, (_, _, gone) = self.entries.popitem(last=False)
                self.bytes -= gone

    def get(self, rid: str) -> tuple[dict, list[dict]] | None:
        with self.lock:
            entry = self.entries.get(rid)
            if entry is None:
                return None
            self.entries.move_to_end(rid)
            return entry[0], entry[1]

    def delete(self, rid: str) -> bool:
        with self.lock:
            entry = self.entries.pop(rid, None)
            if entry is not None:
                self.bytes -= entry[2]
            return entry is not None


def now() -> float:
    return round(time.time(), 3)
