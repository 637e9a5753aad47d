"""GLM-4.5 tool calls: the tools a request offers, the calls the model writes, and the grammars that force them.

The model calls a function as `<tool_call>{name}\\n<arg_key>{key}</arg_key>\\n<arg_value>{value}</arg_value>...
</tool_call>` (string values raw, others JSON); the content is the text before the first call. Arguments are
coerced by the tool's JSON schema: a `string` parameter stays raw, others are `json.loads`ed, else kept raw.
`tool_choice: "required"` and a named function are grammars instead (vLLM's way): a JSON array of
{"name", "parameters"} objects, or that function's parameters; the calls are read back from that JSON. Tools under
`auto` beside a JSON answer format (response_format) are one grammar: that array, or the answer.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import FieldError
from ..outputs import ToolCall
from ..sampling_params import StructuredOutputsParams

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
TOOL_MARKERS = (CALL_OPEN, CALL_CLOSE, KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE, "<tool_response>",
                "</tool_response>")
_ARG = re.compile(re.escape(KEY_OPEN) + r"(.*?)" + re.escape(KEY_CLOSE) + r"\s*" + re.escape(VALUE_OPEN)
                  + r"(.*?)" + re.escape(VALUE_CLOSE), re.S)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def check_tools(tools: Any, where: str = "tools") -> dict[str, dict]:
    """OpenAI tools -> {name: parameters schema}; a malformed tool is an error naming it."""
    if not isinstance(tools, list) or not tools:
        raise FieldError("", where, tools, "expected a non-empty list of {'type': 'function', 'function': {...}}")
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise FieldError("", f"{where}[{i}]", tool, "expected {'type': 'function', 'function': {...}}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise FieldError("", f"{where}[{i}].function.name", name, "expected 1-64 letters, digits, _ . or -")
        if name in out:
            raise FieldError("", f"{where}[{i}].function.name", name, "two tools have this name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise FieldError("", f"{where}[{i}].function.parameters", params, "expected a JSON schema object")
        out[name] = params
    return out


def coerce(raw: str, schema: dict | None) -> Any:
    """An <arg_value> as its parameter's type says: strings raw, anything else JSON when it parses."""
    if isinstance(schema, dict) and schema.get("type") == "string":
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _arguments(body: str, params: dict | None) -> dict:
    props = (params or {}).get("properties") or {}
    return {k.strip(): coerce(v, props.get(k.strip())) for k, v in _ARG.findall(body)}


def _call(body: str, tools: dict[str, dict]) -> ToolCall:
    name = _name(body)
    return ToolCall(new_call_id(), name, json.dumps(_arguments(body, tools.get(name)), ensure_ascii=False))


def parse_tool_calls(text: str, tools: dict[str, dict]) -> tuple[str, list[ToolCall]]:
    """A whole answer -> (content before the first call, the calls). An unclosed last call is still a call. A
    call to a function the request did not declare is text: content before the first real call, else dropped
    with the text between calls."""
    pieces = text.split(CALL_OPEN)
    content, calls = pieces[0], []
    for chunk in pieces[1:]:
        body = chunk.split(CALL_CLOSE, 1)[0]
        if _name(body) in tools:
            calls.append(_call(body, tools))
        elif not calls:
            content += CALL_OPEN + chunk
    return content, calls


def _name(body: str) -> str:
    return re.split(r"\n|" + re.escape(KEY_OPEN), body, maxsplit=1)[0].strip()


@dataclass
class CallDelta:
    """One streamed piece of a call: its header (id and name) once, then pieces of its arguments' JSON text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


class ToolCallStream:
    """Content deltas -> (content delta, call deltas). Content is shown until `<tool_call>`; each call's name is
    sent once it is complete, then its arguments as each key and value closes (`{"k": v`, `, "k": v`, then `}`),
    so the pieces concatenate to the parsed call's arguments. Text between and after calls is not content (as in
    the whole-answer parse), and a call to an undeclared function is text; a tag split across deltas is held
    back."""

    def __init__(self, tools: dict[str, dict], parallel: bool = True):
        self.tools, self.parallel = tools, parallel
        self.buffer = ""
        self.state = "content"  # content -> name -> args -> between -> name ... (done: no more calls wanted);
        # name -> text: a call to an undeclared function, text until its </tool_call>
        self.index = -1
        self.name = ""
        self.args_sent = 0

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        self.buffer += text
        content, out = "", []
        while True:
            if self.state in ("content", "between"):
                at = self.buffer.find(CALL_OPEN)
                if at < 0:
                    keep = next((k for k in range(len(CALL_OPEN) - 1, 0, -1) if self.buffer.endswith(CALL_OPEN[:k])),
                                0)
                    if self.state == "content":
                        content += self.buffer[: len(self.buffer) - keep]
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return content, out
                if self.state == "content":
                    content += self.buffer[:at]
                self.buffer = self.buffer[at + len(CALL_OPEN) :]
                self.state, self.name, self.args_sent = "name", "", 0
            elif self.state == "name":
                m = re.search(r"\n|" + re.escape(KEY_OPEN) + "|" + re.escape(CALL_CLOSE), self.buffer)
                if m is None:
                    return content, out
                name = self.buffer[: m.start()].strip()
                if name not in self.tools:
                    content += CALL_OPEN + self.buffer[: m.start()] if self.index < 0 else ""
                    self.buffer, self.state = self.buffer[m.start() :], "text"
                    continue
                self.index += 1
                self.name, self.buffer, self.state = name, self.buffer[m.start() :], "args"
                out.append(CallDelta(self.index, "", new_call_id(), self.name))
            elif self.state == "text":
                end = self.buffer.find(CALL_CLOSE)
                keep = 0 if end >= 0 else next(
                    (k for k in range(len(CALL_CLOSE) - 1, 0, -1) if self.buffer.endswith(CALL_CLOSE[:k])), 0)
                upto = end + len(CALL_CLOSE) if end >= 0 else len(self.buffer) - keep
                content += self.buffer[:upto] if self.index < 0 else ""
                self.buffer = self.buffer[upto:]
                if end < 0:
                    return content, out
                self.state = "content" if self.index < 0 else "between"
            elif self.state == "args":
                end = self.buffer.find(CALL_CLOSE)
                out += self._arguments(self.buffer if end < 0 else self.buffer[:end])
                if end < 0:
                    return content, out
                out.append(CallDelta(self.index, "}" if self.args_sent else "{}"))
                self.buffer = self.buffer[end + len(CALL_CLOSE) :]
                self.state = "between" if self.parallel else "done"
            else:  # done
                self.buffer = ""
                return content, out

    def flush(self) -> tuple[str, list[CallDelta]]:
        """The end of the answer: an unclosed call is closed with what it has."""
        content, out = self.feed("")
        if self.state == "content" or (self.state == "text" and self.index < 0):
            content, self.buffer = content + self.buffer, ""
        elif self.state == "name" and self.buffer.strip() in self.tools:
            self.index += 1
            out.append(CallDelta(self.index, "", new_call_id(), self.buffer.strip()))
            out.append(CallDelta(self.index, "{}"))
        elif self.state == "name" and self.index < 0:
            content += CALL_OPEN + self.buffer
        elif self.state == "args":
            out += self._arguments(self.buffer)
            out.append(CallDelta(self.index, "}" if self.args_sent else "{}"))
        self.buffer, self.state = "", "done"
        return content, out

    def _arguments(self, body: str) -> list[CallDelta]:
        out = []
        params = (self.tools.get(self.name) or {}).get("properties") or {}
        for m in list(_ARG.finditer(body))[self.args_sent :]:
            key = m.group(1).strip()
            value = json.dumps(coerce(m.group(2), params.get(key)), ensure_ascii=False)
            out.append(CallDelta(self.index, ("{" if self.args_sent == 0 else ", ") + json.dumps(key, ensure_ascii=False)
                                 + ": " + value))
            self.args_sent += 1
        return out


def required_grammar(tools: dict[str, dict], parallel: bool) -> StructuredOutputsParams:
    """tool_choice "required": an array of calls ({"name", "parameters"}), one at most without parallel calls."""
    items = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                        "required": ["name", "parameters"], "additionalProperties": False}
                       for name, params in tools.items()]}
    schema = {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    return StructuredOutputsParams(json=schema, origin="tool_choice")


def calls_or_answer_grammar(tools: dict[str, dict], parallel: bool,
                            answer: StructuredOutputsParams) -> StructuredOutputsParams:
    """tools under auto beside a JSON answer format: the reply is the calls (required's array) or the answer,
    one JSON schema (anyOf; the answer's $defs lifted to the root, where its references point)."""
    schema = dict(answer.value)
    defs = {k: schema.pop(k) for k in ("$defs", "definitions") if k in schema}
    union = {"anyOf": [required_grammar(tools, parallel).json, schema], **defs}
    return StructuredOutputsParams(json=union, strict=answer.strict, origin=answer.origin)


def is_calls_reply(text: str, tools: dict[str, dict], answer: StructuredOutputsParams) -> bool | None:
    """Whether a calls-or-answer reply is the calls: a reply opening with `[` is, unless the answer may be an array
    itself, when the whole reply decides (None: not yet known)."""
    s = text.lstrip()
    if not s:
        return None
    if s[0] != "[":
        return False
    kinds = answer.value.get("type")
    if "array" not in (kinds if isinstance(kinds, list) else [kinds]):
        return True
    try:
        value = json.loads(s)
    except ValueError:
        return None
    return bool(value) and all(isinstance(c, dict) and set(c) == {"name", "parameters"} and c["name"] in tools
                               for c in value)


class CallsOrAnswerStream:
    """A calls-or-answer reply as it streams: the calls (as required's stream sends them) or the answer as content;
    held back until the reply shows which."""

    def __init__(self, tools: dict[str, dict], answer: StructuredOutputsParams):
        self.tools, self.answer = tools, answer
        self.held, self.inner = "", None

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        if self.inner is None:
            self.held += text
            calls = is_calls_reply(self.held, self.tools, self.answer)
            if calls is None:
                return "", []
            self.inner, text, self.held = (RequiredCallsStream() if calls else PlainStream()), self.held, ""
        return self.inner.feed(text)

    def flush(self) -> tuple[str, list[CallDelta]]:
        if self.inner is None:  # never decided: what there is, is content
            self.inner, held, self.held = PlainStream(), self.held, ""
            return held, []
        return self.inner.flush()


def named_grammar(tools: dict[str, dict], name: str) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=tools[name], origin=f"tools[{list(tools).index(name)}].function.parameters")


def calls_from_json(text: str, named: str | None) -> list[ToolCall]:
    """The calls a required / named grammar made (an unfinished reply gives what parses, possibly none). A named
    call's arguments are the reply's JSON text as written, which is what its stream sent."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if named is not None:
        return [ToolCall(new_call_id(), named, text.strip())]
    return [ToolCall(new_call_id(), c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
            for c in value if isinstance(c, dict) and isinstance(c.get("name"), str)]


class NamedCallStream:
    """tool_choice naming a function: one call, its header first, the reply's JSON text as its arguments."""

    def __init__(self, name: str):
        self.name, self.started = name, False

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        out = [] if self.started else [CallDelta(0, "", new_call_id(), self.name)]
        self.started = True
        return "", out + ([CallDelta(0, text)] if text else [])

    def flush(self) -> tuple[str, list[CallDelta]]:
        return self.feed("")


class RequiredCallsStream:
    """tool_choice "required": the reply is a JSON array of {"name", "parameters"}; each call is sent whole as its
    element closes (found by bracket depth outside strings)."""

    def __init__(self):
        self.text, self.at, self.depth, self.in_string, self.escape = "", 0, 0, False, False
        self.start, self.index = -1, 0

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        self.text += text
        out = []
        for i in range(self.at, len(self.text)):
            ch = self.text[i]
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.depth += 1
                if self.depth == 2:
                    self.start = i
            elif ch in "]}":
                self.depth -= 1
                if self.depth == 1 and self.start >= 0:
                    out += self._element(self.text[self.start : i + 1])
                    self.start = -1
        self.at = len(self.text)
        return "", out

    def _element(self, text: str) -> list[CallDelta]:
        calls = calls_from_json(f"[{text}]", None)
        out = []
        for c in calls:
            out += [CallDelta(self.index, "", c.id, c.name), CallDelta(self.index, c.arguments)]
            self.index += 1
        return out

    def flush(self) -> tuple[str, list[CallDelta]]:
        return self.feed("")


class PlainStream:
    """tool_choice "none" (or no tools): all content."""

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        return text, []

    def flush(self) -> tuple[str, list[CallDelta]]:
        return "", []


@dataclass
class ToolUse:
    """What a request asked of its tools: `mode` auto (the model may call, calls are parsed), required or a named
    function (a grammar makes the calls), or none (the tools are shown, nothing is parsed)."""

    tools: dict[str, dict]
    mode: str = "auto"
    name: str | None = None
    parallel: bool = True
    raw: list = field(default_factory=list)  # the tools as given: what the chat template renders
    answer: StructuredOutputsParams | None = None  # under auto: a JSON format a reply that calls nothing must meet

    @property
    def breaks(self) -> tuple[str, ...]:
        """Markers that end the reasoning: a call the model starts while thinking (auto only)."""
        return (CALL_OPEN,) if self.mode == "auto" and self.answer is None else ()

    def grammar(self) -> StructuredOutputsParams | None:
        if self.mode == "required":
            return required_grammar(self.tools, self.parallel)
        if self.mode == "named":
            return named_grammar(self.tools, self.name)
        if self.mode == "auto" and self.answer is not None:
            return calls_or_answer_grammar(self.tools, self.parallel, self.answer)
        return None

    def stream(self):
        if self.mode == "auto" and self.answer is not None:
            return CallsOrAnswerStream(self.tools, self.answer)
        if self.mode == "auto":
            return ToolCallStream(self.tools, self.parallel)
        if self.mode == "named":
            return NamedCallStream(self.name)
        if self.mode == "required":
            return RequiredCallsStream()
        return PlainStream()

    def parse(self, content: str) -> tuple[str | None, list[ToolCall]]:
        """An answer's content -> (content, calls) under this mode."""
        if self.mode == "none":
            return content, []
        if self.mode in ("required", "named") or (self.answer is not None
                                                   and is_calls_reply(content, self.tools, self.answer)):
            calls = calls_from_json(content, self.name)
            return (None if calls else content), calls
        if self.answer is not None:
            return content, []
        text, calls = parse_tool_calls(content, self.tools)
        return text, calls if self.parallel else calls[:1]
