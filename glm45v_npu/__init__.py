"""glm45v-npu: a lightweight, fast inference runner for GLM-4.5V.

The public names load lazily, so `import glm45v_npu` (and `glm45v --help`) does not import torch."""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob",
           "ToolCall", "EngineConfig"]

_WHERE = {"LLM": ".llm", "SamplingParams": ".sampling_params", "StructuredOutputsParams": ".sampling_params",
          "RequestOutput": ".outputs", "CompletionOutput": ".outputs", "Logprob": ".outputs", "ToolCall": ".outputs",
          "EngineConfig": ".engine.config"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
