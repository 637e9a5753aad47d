"""LLM: the Python API over one Engine, shaped like vLLM's (generate, chat), plus stream() and the step-level
calls (add_request, step, abort) for callers that drive the engine themselves."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .engine.answer import split_reasoning
from .engine.config import EngineConfig
from .engine.engine import Engine, EngineStats
from .engine.progress import ProgressBar
from .engine.tool_calls import ToolUse, check_tools
from .errors import Glm45vError
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams, effort_budget

log = logging.getLogger("glm45v_npu")

# Old argument names, accepted for one release with a warning.
DEPRECATED = {"memory_fraction": "gpu_memory_utilization", "expert_parallel": "enable_expert_parallel"}
# vLLM arguments that mean nothing here; accepted so vLLM scripts run unchanged.
IGNORED = {"trust_remote_code", "disable_log_stats", "tokenizer_mode"}


def engine_config(model: str | Path, **kwargs: Any) -> EngineConfig:
    """LLM's keyword arguments -> EngineConfig: vLLM's names, the deprecated old names, dtype as a torch dtype."""
    for old, new in DEPRECATED.items():
        if old in kwargs:
            warnings.warn(f"LLM({old}=...) is deprecated; use {new}=...", FutureWarning, stacklevel=3)
            if new in kwargs:
                raise Glm45vError(f"LLM: pass {new} or its old name {old}, not both")
            kwargs[new] = kwargs.pop(old)
    for name in IGNORED & set(kwargs):
        log.info("LLM(%s=...) has no effect here", name)
        kwargs.pop(name)
    dtype = kwargs.get("dtype")
    if isinstance(dtype, torch.dtype):
        kwargs["dtype"] = str(dtype).removeprefix("torch.")
    elif dtype == "auto":
        kwargs["dtype"] = None
    known = set(EngineConfig.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise Glm45vError(f"LLM: unknown argument(s) {', '.join(unknown)}")
    return EngineConfig(model=str(model), **kwargs)


class LLM:
    def __init__(self, model: str | Path, **kwargs: Any):
        self.engine = Engine(engine_config(model, **kwargs))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = Engine(config)
        return llm

    # what the CLI and callers read
    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    def get_default_sampling_params(self) -> SamplingParams:
        """The checkpoint's generation defaults (unless generation_config="vllm"), as vLLM's LLM gives them."""
        return self.engine.default_sampling_params()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def close(self) -> None:
        """Stop the worker ranks (if any) and leave the process group."""
        self.engine.close()

    # --- step level -------------------------------------------------------------------------------------

    def add_request(self, request: str | dict, params: SamplingParams | None = None,
                    enable_thinking: bool | None = None, request_id: str | None = None) -> str:
        return self.engine.add_request(request, params or self.get_default_sampling_params(), enable_thinking,
                                       request_id)

    def step(self) -> list[RequestOutput]:
        return self.engine.step()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    # --- whole requests ---------------------------------------------------------------------------------

    def generate(self, prompts: str | dict | list, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 *, use_tqdm: bool = False, enable_thinking: bool | None = None) -> list[RequestOutput]:
        """All prompts together with continuous batching; outputs in prompt order. A prompt that is malformed or
        can never fit comes back with `error` set (and finish_reason "abort"); the others go on. If this call is
        interrupted, its requests are aborted and the engine is left clean."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise Glm45vError(f"generate: {len(prompts)} prompts but {len(params)} SamplingParams")
        slots: list[str | RequestOutput] = []
        mine: set[str] = set()
        results: dict[str, RequestOutput] = {}
        bar = ProgressBar("generating", len(prompts)) if use_tqdm else None
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                p = p or self.get_default_sampling_params()
                try:
                    rid = self.engine.add_request(prompt, replace(p, output_kind="final_only"), enable_thinking)
                except Glm45vError as e:
                    slots.append(_rejected(prompt, f"request {i}: {e}"))
                    continue
                slots.append(rid)
                mine.add(rid)
            while mine - results.keys():
                for out in self.engine.step():
                    if out.finished and out.request_id in mine:
                        results[out.request_id] = out
                        if bar:
                            bar.advance()
        finally:
            if bar:
                bar.stop()
            for rid in mine - results.keys():
                self.engine.abort(rid, report=False)
        return [s if isinstance(s, RequestOutput) else results[s] for s in slots]

    def chat(self, messages: list, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             chat_template_kwargs: dict | None = None, tools: list | None = None, reasoning_effort: str | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """One conversation (a list of messages) or several (a list of lists), through the checkpoint's chat
        template; `chat_template_kwargs` reach the template (e.g. enable_thinking=False). With `tools` (OpenAI's
        shape) the template offers them and each output's `tool_calls` holds the calls parsed from its text.
        `reasoning_effort` as the server takes it: none/minimal turn thinking off, low/medium/high set
        SamplingParams.thinking_token_budget (sampling_params.REASONING_BUDGETS)."""
        if not isinstance(messages, list) or not messages:
            raise Glm45vError("chat: expected a list of messages, or a list of conversations")
        conversations = messages if isinstance(messages[0], list) else [messages]
        kwargs = dict(chat_template_kwargs or {})
        if reasoning_effort is not None:
            budget = effort_budget(reasoning_effort, "chat: ")
            if budget == 0:
                kwargs.setdefault("enable_thinking", False)
            params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(conversations)
            sampling_params = [replace(p or self.get_default_sampling_params(), thinking_token_budget=budget)
                               for p in params]
        requests = [{"messages": c, "chat_template_kwargs": dict(kwargs)} for c in conversations]
        tool_use = None
        if tools is not None:
            tool_use = ToolUse(check_tools(tools), raw=list(tools))
            for r in requests:
                r["tools"] = tool_use.raw
        outs = self.generate(requests, sampling_params, use_tqdm=use_tqdm)
        for out in outs if tool_use else []:
            for c in out.outputs:
                c.tool_calls = tool_use.parse(split_reasoning(c.text, tool_use.breaks)[1])[1]
        return outs

    def stream(self, request: str | dict, params: SamplingParams | None = None,
               enable_thinking: bool | None = None) -> Iterator[str]:
        """Text deltas of one request as tokens are sampled; closing the iterator early aborts the request.
        It drives the engine itself: use add_request/step when other requests share it."""
        rid = self.engine.add_request(request, replace(params or self.get_default_sampling_params(), n=1,
                                                       output_kind="delta"),
                                      enable_thinking)
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        if out.outputs and out.outputs[0].text:
                            yield out.outputs[0].text
        finally:
            if not done:
                self.engine.abort(rid, report=False)


def _rejected(prompt: Any, error: str) -> RequestOutput:
    return RequestOutput(request_id="", prompt=prompt if isinstance(prompt, str) else None, prompt_token_ids=[],
                         outputs=[CompletionOutput(0, "", [], None, None, finish_reason="abort")], finished=True,
                         metrics=RequestMetrics(arrival_time=time.perf_counter()), error=error)
