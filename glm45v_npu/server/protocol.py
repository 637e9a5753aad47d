"""OpenAI request bodies (the fields this server honours; unknown fields are ignored, as OpenAI-compatible
servers do) and what the engine makes of them: SamplingParams, requests, response objects and stream chunks."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..engine.answer import ReasoningStream, parse_boxes
from ..engine.tool_calls import CallDelta, PlainStream, ToolUse, check_tools
from ..errors import FieldError
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import (
    MAX_LOGPROBS,
    STRUCTURED_KINDS,
    SamplingParams,
    StructuredOutputsParams,
    effort_budget,
)

TEMPLATE_KWARGS = {"enable_thinking": bool}
MAX_STOP_STRINGS, MAX_STOP_CHARS = 32, 1024  # each stop string is searched for after every token


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    structured_outputs: Any = None  # vLLM's: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    guided_json: Any = None  # vLLM's older names for the same
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    thinking_token_budget: int | None = None  # vLLM's name: most tokens of reasoning before </think> is forced

    def unsupported(self) -> str | None:
        """A field this server refuses (named in the 400), or None."""
        return None

    def grammars(self) -> list[StructuredOutputsParams]:
        """The grammars the body asks for by vLLM's fields (more than one is refused by the caller)."""
        out = []
        if self.structured_outputs is not None:
            given = self.structured_outputs
            if not isinstance(given, dict):
                raise FieldError("", "structured_outputs", given, f"expected an object with one of "
                                 f"{', '.join(STRUCTURED_KINDS)}")
            known = {*STRUCTURED_KINDS, "disable_any_whitespace", "strict"}
            unknown = sorted(set(given) - known)
            if unknown:
                raise FieldError("", f"structured_outputs.{unknown[0]}", given[unknown[0]], "not accepted here "
                                 f"(accepted: {', '.join(sorted(known))})")
            kinds = [k for k in STRUCTURED_KINDS if given.get(k) is not None]
            out.append(StructuredOutputsParams(**given, origin=f"structured_outputs.{kinds[0]}" if len(kinds) == 1
                                               else "structured_outputs"))
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                out.append(StructuredOutputsParams(**{kind: value}, origin=f"guided_{kind}"))
        return out

    def sampling(self, defaults: dict, max_tokens: int | None, logprobs: int | None,
                 grammar: StructuredOutputsParams | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
        """The request's values over the checkpoint's generation defaults; no max_tokens anywhere means up to
        the context."""
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                 "repetition_penalty": self.repetition_penalty, "seed": self.seed, "max_tokens": max_tokens}
        values = {**defaults, **{k: v for k, v in given.items() if v is not None}}
        values.setdefault("max_tokens", None)
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stop) > MAX_STOP_STRINGS or any(len(t) > MAX_STOP_CHARS for t in stop):
            raise FieldError("", "stop", f"{len(stop)} strings", f"at most {MAX_STOP_STRINGS} strings of at most "
                             f"{MAX_STOP_CHARS} characters")
        return SamplingParams(**values, n=self.n,
                              stop=self.stop or [], stop_token_ids=self.stop_token_ids or [],
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, logprobs=logprobs,
                              skip_special_tokens=self.skip_special_tokens,
                              include_stop_str_in_output=self.include_stop_str_in_output,
                              output_kind="delta" if self.stream else "final_only", structured_outputs=grammar,
                              thinking_token_budget=self.budget(), prompt_logprobs=prompt_logprobs)

    def budget(self) -> int | None:
        return self.thinking_token_budget


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    response_format: Any = None
    reasoning_effort: str | None = None

    def budget(self) -> int | None:
        """thinking_token_budget, else reasoning_effort's budget."""
        effort = None if self.reasoning_effort is None else effort_budget(self.reasoning_effort)
        return self.thinking_token_budget if self.thinking_token_budget is not None else effort

    def tool_use(self) -> ToolUse | None:
        """The tools and what tool_choice asks of them; None without tools."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none"):
                raise FieldError("", "tool_choice", choice, "needs tools")
            return None
        tools = check_tools(self.tools)
        name = None
        if isinstance(choice, dict):
            fn = choice.get("function") if choice.get("type") == "function" else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(name, str):
                raise FieldError("", "tool_choice", choice, "expected {'type': 'function', 'function': {'name': ...}}")
            if name not in tools:
                raise FieldError("", "tool_choice.function.name", name, f"not one of the tools ({', '.join(tools)})")
            mode = "named"
        elif choice in (None, "auto", "none", "required"):
            mode = choice or "auto"
        else:
            raise FieldError("", "tool_choice", choice, "expected none, auto, required or a named function")
        return ToolUse(tools, mode, name, self.parallel_tool_calls, list(self.tools))

    def response_grammar(self) -> StructuredOutputsParams | None:
        f = self.response_format
        if f is None:
            return None
        kind = f.get("type") if isinstance(f, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True, origin="response_format")
        if kind != "json_schema":
            raise FieldError("", "response_format.type", kind, "expected text, json_object or json_schema")
        spec = f.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise FieldError("", "response_format.json_schema.schema", None if not isinstance(spec, dict)
                             else spec.get("schema"), "expected a JSON schema object")
        strict = spec.get("strict")
        return StructuredOutputsParams(json=spec["schema"], strict=strict is not False,
                                       origin="response_format.json_schema.schema")

    def grammar(self, tool_use: ToolUse | None) -> StructuredOutputsParams | None:
        """The one grammar of the answer: the tool choice's, response_format's or vLLM's fields'. A tool_choice that
        forces a call leaves response_format nothing to hold (the reply is the call, as OpenAI has it)."""
        forced = tool_use is not None and tool_use.mode in ("required", "named")
        fmt = self.response_grammar()  # checked even when it holds nothing
        named = [("tool_choice", tool_use.grammar() if tool_use else None), ("response_format", None if forced else fmt)]
        named += [(g.origin.split(".")[0], g) for g in self.grammars()]
        given = [(field, g) for field, g in named if g is not None]
        if tool_use is not None and tool_use.mode == "auto" and given:
            if len(given) > 1 or given[0][1].kind not in ("json", "json_object"):
                raise FieldError("", given[0][0], "given", "beside tools under tool_choice auto only a JSON format "
                                 "(response_format json_schema or json_object) is taken: the reply calls tools or "
                                 "answers in it")
            tool_use.answer = given[0][1]
            return tool_use.grammar()
        if len(given) > 1:
            raise FieldError("", given[1][0], "given", f"cannot be combined with {given[0][0]} (one grammar per "
                             "request)")
        return given[0][1] if given else None

    def template_kwargs(self) -> dict:
        """chat_template_kwargs, which reach the checkpoint's own template: an allow-list of values, never a
        template of the client's (a template is code that would run in this process)."""
        given = self.chat_template_kwargs or {}
        for name, value in given.items():
            if name not in TEMPLATE_KWARGS:
                raise FieldError("", f"chat_template_kwargs.{name}", value,
                                 f"not accepted here (accepted: {', '.join(sorted(TEMPLATE_KWARGS))})")
            if not isinstance(value, TEMPLATE_KWARGS[name]):
                raise FieldError("", f"chat_template_kwargs.{name}", value, "expected true or false")
        out = dict(given)
        if self.budget() == 0:  # reasoning_effort none/minimal or a zero budget: the template's own "off"
            out.setdefault("enable_thinking", False)
        return out

    def params(self, defaults: dict, tool_use: ToolUse | None = None) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("", "top_logprobs", self.top_logprobs, "needs logprobs: true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise FieldError("", "top_logprobs", self.top_logprobs, f"must be in 0..{MAX_LOGPROBS}")
        return self.sampling(defaults, self.max_completion_tokens or self.max_tokens,
                             (self.top_logprobs or 0) if self.logprobs else None, self.grammar(tool_use))

    def prepared(self, defaults: dict, max_model_len: int) -> tuple[ToolUse | None, SamplingParams, dict]:
        """Tools, sampling parameters and template arguments, every size checked (schemas are counted here)."""
        tool_use = self.tool_use()
        params = self.params(defaults, tool_use)
        check_share(params, self.stream, max_model_len)
        return tool_use, params, self.template_kwargs()


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False  # the prompt before the completion, with its logprobs when logprobs is asked
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and the top N, in the choice
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix"
        return None

    def prompts(self) -> list[dict]:
        p = self.prompt
        if isinstance(p, str):
            return [{"prompt": p}]
        if p and all(isinstance(t, int) for t in p):
            return [{"prompt_token_ids": list(p)}]
        if p and all(isinstance(t, str) for t in p):
            return [{"prompt": t} for t in p]
        if p and all(isinstance(t, list) for t in p):
            return [{"prompt_token_ids": list(t)} for t in p]
        raise FieldError("", "prompt", p, "expected a string, a list of token ids, or a list of either")

    def params(self, defaults: dict) -> SamplingParams:
        grammars = self.grammars()
        if len(grammars) > 1:
            raise FieldError("", grammars[1].origin, "given", f"cannot be combined with {grammars[0].origin}")
        asked = self.prompt_logprobs if self.prompt_logprobs is not None else self.logprobs if self.echo else None
        return self.sampling(defaults, self.max_tokens, self.logprobs, grammars[0] if grammars else None, asked)

    def prepared(self, defaults: dict, max_model_len: int) -> SamplingParams:
        """Sampling parameters, every size checked (a grammar is counted here; a prompt's logprobs by its length,
        at most a token per byte)."""
        params = self.params(defaults)
        check_share(params, self.stream, max_model_len, top_field="logprobs")
        if params.prompt_logprobs is not None:
            size = max(len(p["prompt"].encode()) if "prompt" in p else len(p["prompt_token_ids"])
                       for p in self.prompts())
            entries = min(size, max_model_len) * (1 + params.prompt_logprobs)
            if entries > MAX_WHOLE_LOGPROBS:
                raise FieldError("", "prompt_logprobs" if self.prompt_logprobs is not None else "logprobs",
                                 params.prompt_logprobs, f"the prompt's logprobs would take {entries} entries, over "
                                 f"the limit of {MAX_WHOLE_LOGPROBS}; ask for fewer top logprobs")
        return params


# A whole (not streamed) answer is built in one piece (README: "Limits"): at most this many logprob entries
# (n x tokens x (1 + top)); 64 x 1000 x 21 of them made a 90 MB body that held the server for a minute.
MAX_WHOLE_LOGPROBS = 200_000


def check_share(params: SamplingParams, stream: bool, max_model_len: int, top_field: str = "top_logprobs") -> None:
    """Refuse, naming the field and the limit, a whole answer too large to build in one piece."""
    if params.logprobs is not None and not stream:
        tokens = min(params.max_tokens or max_model_len, max_model_len)
        entries = params.n * tokens * (1 + params.logprobs)
        if entries > MAX_WHOLE_LOGPROBS:
            raise FieldError("", top_field if params.logprobs else "max_tokens", params.logprobs,
                             f"n x max_tokens x (1 + top logprobs) = {entries} logprob entries in one whole answer, "
                             f"over the limit of {MAX_WHOLE_LOGPROBS}; stream it, or ask for fewer")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(out: RequestOutput) -> dict:
    """Counts of the whole request (its metrics hold every token, also when `out` is a streamed delta)."""
    completion = sum(len(times) for times in out.metrics.token_times)
    prompt = len(out.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


def _token(lp) -> dict:
    text = lp.decoded_token or ""
    return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode())}


def chat_logprobs(c: CompletionOutput, top_n: int) -> dict | None:
    """OpenAI chat logprobs of c's tokens: each sampled token and the top_n most likely ones."""
    if c.logprobs is None:
        return None
    content = []
    for token, entry in zip(c.token_ids, c.logprobs):
        top = sorted((lp for lp in entry.values() if lp.rank <= top_n), key=lambda lp: lp.rank)
        content.append({**_token(entry[token]), "top_logprobs": [_token(lp) for lp in top]})
    return {"content": content}


def completion_logprobs(c: CompletionOutput, text_offset: int = 0, echo: Echo | None = None) -> dict | None:
    """OpenAI completion logprobs; with echo, the prompt's tokens first (the first one has no logprob)."""
    if c.logprobs is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    at = text_offset
    pairs = list(zip(c.token_ids, c.logprobs))
    if echo is not None:
        pairs = list(zip(echo.token_ids, echo.logprobs)) + pairs
    for token, entry in pairs:
        if entry is None:  # the prompt's first token
            text, value, top = echo.first, None, None
        else:
            chosen = entry[token]
            text, value = chosen.decoded_token or "", chosen.logprob
            top = {(lp.decoded_token or ""): lp.logprob for lp in entry.values()}
        tokens.append(text)
        values.append(value)
        tops.append(top)
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


@dataclass
class Echo:
    """What echo puts before a completion: the prompt's text, its tokens and their logprobs."""

    text: str
    token_ids: list[int]
    logprobs: list  # RequestOutput.prompt_logprobs
    first: str  # the first token's text (it has no logprob entry to carry it)


def prompt_logprobs_field(out: RequestOutput) -> list | None:
    """vLLM's prompt_logprobs on a completion choice: per prompt token, None first, then {id: entry}."""
    if out.prompt_logprobs is None:
        return None
    return [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                                    for t, lp in e.items()} for e in out.prompt_logprobs]


def created() -> int:
    return int(time.time())


class ChatChoice:
    """One choice's text -> OpenAI's message pieces (reasoning, content, tool-call deltas), as it streams; the
    whole response is the same pieces put together, so a stream and a response always agree."""

    def __init__(self, tool_use: ToolUse | None):
        self.reasoning = ReasoningStream(tool_use.breaks if tool_use else ())
        self.tools = tool_use.stream() if tool_use else PlainStream()
        self.called = False
        self.content = ""

    def feed(self, text: str, final: bool, image_sizes: list | None = None) -> dict:
        """The next delta; the final one carries `boxes` (an extension field, in the content's coordinates and
        the last image's pixels) when the answer has any."""
        reasoning, content = self.reasoning.feed(text)
        if final:
            r, c = self.reasoning.flush()
            reasoning, content = reasoning + r, content + c
        content, calls = self.tools.feed(content)
        if final:
            c, more = self.tools.flush()
            content, calls = content + c, calls + more
        delta = {k: v for k, v in (("reasoning_content", reasoning), ("reasoning", reasoning), ("content", content))
                 if v}  # the reasoning under both names: vLLM's older one and its newer one
        if calls:
            self.called = True
            delta["tool_calls"] = _merged(calls)
        self.content += content
        if final and (boxes := parse_boxes(self.content, image_sizes)):
            delta["boxes"] = [b.as_dict() for b in boxes]
        return delta

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.called and reason == "stop" else reason

    def message(self, text: str, image_sizes: list | None = None) -> dict:
        delta = self.feed(text, final=True, image_sizes=image_sizes)
        calls = delta.get("tool_calls", [])
        content = delta.get("content")
        message = {"role": "assistant", "content": None if calls and not (content or "").strip() else content or "",
                   "reasoning_content": delta.get("reasoning_content"), "reasoning": delta.get("reasoning")}
        if calls:
            message["tool_calls"] = calls
        if "boxes" in delta:
            message["boxes"] = delta["boxes"]
        return message


def _merged(deltas: list[CallDelta]) -> list[dict]:
    """Call deltas of one step, one entry per call: its header (first time) and its new arguments text."""
    out: dict[int, dict] = {}
    for d in deltas:
        entry = out.setdefault(d.index, {"index": d.index, "function": {"arguments": ""}})
        if d.id is not None:
            entry.update(id=d.id, type="function")
            entry["function"]["name"] = d.name
        entry["function"]["arguments"] += d.arguments
    return list(out.values())


def chat_response(out: RequestOutput, cid: str, made: int, model: str, top_n: int,
                  tool_use: ToolUse | None = None) -> dict:
    choices = []
    for c in out.outputs:
        choice = ChatChoice(tool_use)
        message = choice.message(c.text, out.image_sizes)
        choices.append({"index": c.index, "message": message, "logprobs": chat_logprobs(c, top_n),
                        "finish_reason": choice.finish_reason(c.finish_reason), "stop_reason": c.stop_reason})
    return {"id": cid, "object": "chat.completion", "created": made, "model": model, "choices": choices,
            "usage": usage(out)}


def completion_response(out: RequestOutput, cid: str, made: int, model: str, echo: Echo | None = None,
                        prompt_logprobs: bool = False) -> dict:
    choices = [{"index": c.index, "text": (echo.text if echo else "") + c.text,
                "logprobs": completion_logprobs(c, 0, echo) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
    if prompt_logprobs:
        for choice in choices:
            choice["prompt_logprobs"] = prompt_logprobs_field(out)
    return {"id": cid, "object": "text_completion", "created": made, "model": model, "choices": choices,
            "usage": usage(out)}
