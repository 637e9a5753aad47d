"""OpenAI request bodies (the fields this server honours; unknown fields are ignored, as OpenAI-compatible
servers do) and what the engine makes of them: SamplingParams, requests, response objects and stream chunks."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..engine.answer import split_reasoning
from ..errors import FieldError
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams

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

    def sampling(self, defaults: dict, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
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
                              output_kind="delta" if self.stream else "final_only")


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        return None

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
        return dict(given)

    def params(self, defaults: dict) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("", "top_logprobs", self.top_logprobs, "needs logprobs: true")
        return self.sampling(defaults, self.max_completion_tokens or self.max_tokens,
                             (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
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
        return self.sampling(defaults, self.max_tokens, self.logprobs)


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


def completion_logprobs(c: CompletionOutput, text_offset: int = 0) -> dict | None:
    if c.logprobs is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    at = text_offset
    for token, entry in zip(c.token_ids, c.logprobs):
        chosen = entry[token]
        text = chosen.decoded_token or ""
        tokens.append(text)
        values.append(chosen.logprob)
        tops.append({(lp.decoded_token or ""): lp.logprob for lp in entry.values()})
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def created() -> int:
    return int(time.time())


def chat_response(out: RequestOutput, cid: str, made: int, model: str, top_n: int) -> dict:
    choices = []
    for c in out.outputs:
        reasoning, content = split_reasoning(c.text)
        choices.append({"index": c.index, "message": {"role": "assistant", "content": content,
                                                      "reasoning_content": reasoning or None},
                        "logprobs": chat_logprobs(c, top_n), "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason})
    return {"id": cid, "object": "chat.completion", "created": made, "model": model, "choices": choices,
            "usage": usage(out)}


def completion_response(out: RequestOutput, cid: str, made: int, model: str) -> dict:
    choices = [{"index": c.index, "text": c.text, "logprobs": completion_logprobs(c),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
    return {"id": cid, "object": "text_completion", "created": made, "model": model, "choices": choices,
            "usage": usage(out)}
