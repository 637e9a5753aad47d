"""EngineConfig: every option of one engine, checked once, in one place. The CLI and LLM build it; nothing
else takes engine options one by one."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import FieldError

LOAD_FORMATS = ("auto", "dummy")
QUANTIZATION = ("auto", "fp8", "none")  # model/quantization.py reads the checkpoint for "auto"
MEDIA_KINDS = ("image", "video")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    # where and how
    device: str | None = None  # npu, cuda or cpu; default: the first available
    dtype: str | None = None  # auto (None), bfloat16, float16 or float32
    load_format: str = "auto"  # auto (read weights) or dummy (random, nothing read)
    num_layers: int | None = None  # keep only the first N decoder layers (benchmarks of real shapes)
    revision: str | None = None  # hub revision (branch, tag or commit)
    download_dir: str | None = None  # hub cache folder
    seed: int = 0  # dummy weights and unseeded sampling
    # several devices
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = True  # False: every expert split across ranks instead of whole experts
    dist_timeout_s: float = 120.0
    # KV cache
    block_size: int = 16
    kv_cache_gib: float | None = None  # fixed size; default: from memory (256 MiB on a CPU)
    gpu_memory_utilization: float = 0.9  # share of an accelerator's memory this engine may use in all
    enable_prefix_caching: bool = True
    # weights: "auto" follows the checkpoint (compressed-tensors FP8, msmodelslim W8A8); "fp8" quantizes a float
    # checkpoint's decoder at load; "none" holds FP8 weights as floats
    quantization: str = "auto"
    # scheduling
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    # inputs
    max_pixels: int | None = None
    limit_mm_per_prompt: dict[str, int] = field(default_factory=dict)
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    # sampling defaults: "auto" takes temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens from
    # the checkpoint's generation_config.json; "vllm" ignores that file (vLLM's --generation-config)
    generation_config: str = "auto"
    # decode graphs
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        checks = [
            ("load_format", self.load_format in LOAD_FORMATS, f"expected one of {', '.join(LOAD_FORMATS)}"),
            ("generation_config", self.generation_config in ("auto", "vllm"), "expected auto or vllm"),
            ("quantization", self.quantization in QUANTIZATION, f"expected one of {', '.join(QUANTIZATION)}"),
            ("num_layers", self.num_layers is None or self.num_layers >= 1, "must be >= 1"),
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, "must be >= 1"),
            ("dist_timeout_s", self.dist_timeout_s > 0, "must be > 0"),
            ("block_size", 1 <= self.block_size <= 1024, "must be in 1..1024"),
            ("kv_cache_gib", self.kv_cache_gib is None or self.kv_cache_gib > 0, "must be > 0"),
            ("gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1, "must be in (0, 1]"),
            ("max_num_seqs", self.max_num_seqs >= 1, "must be >= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, "must be >= 1"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 2, "must be >= 2"),
            ("max_pixels", self.max_pixels is None or self.max_pixels >= 28 * 28, "must be >= 784 (one 28x28 patch)"),
            ("seed", self.seed >= 0, "must be >= 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise FieldError("", name, getattr(self, name), why)
        for kind, n in self.limit_mm_per_prompt.items():
            if kind not in MEDIA_KINDS or isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise FieldError("", "limit_mm_per_prompt", self.limit_mm_per_prompt,
                                 f"expected counts >= 0 for {' and '.join(MEDIA_KINDS)}")


_NUMBERS = {"int": (int,), "float": (int, float)}


def _check_type(name: str, value: Any, annotation: str) -> None:
    """Catch wrong types (a string for a size, a bool for a count, NaN) with a message naming the option."""
    optional = "None" in annotation
    if value is None:
        if not optional:
            raise FieldError("", name, value, "a value is required")
        return
    base = annotation.replace(" | None", "")
    why = None
    if base in _NUMBERS:
        if isinstance(value, bool) or not isinstance(value, _NUMBERS[base]):
            why = f"expected {'an integer' if base == 'int' else 'a number'}"
        elif isinstance(value, float) and not math.isfinite(value):
            why = "expected a finite number"
    elif base == "bool" and not isinstance(value, bool):
        why = "expected true or false"
    elif base == "str" and not isinstance(value, str):
        why = "expected a string"
    elif base.startswith("dict") and not isinstance(value, dict):
        why = "expected a mapping"
    if why:
        raise FieldError("", name, value, why)
