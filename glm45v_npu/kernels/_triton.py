"""Shared Triton pieces: how a launch is described, 64-bit row offsets, tl.dot modes (tile sizes: tiles.py).

Every launcher asks one `*_launch(...)` function for its Launch (grid, constexprs, compile options, argument
types) and runs it; the compile check (benchmarks/compile_check.py) compiles exactly those Launches for CUDA and
Ascend. Constexprs depend only
on model shapes, dtypes, the target and a fixed set of batch buckets, never on per-step values such as the
longest context; per-step integers are passed as `do_not_specialize` arguments, so a new step never compiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

DOT_DEFAULT, DOT_IEEE, DOT_UPCAST = 0, 1, 2

MAX_SPLITS = 16


def target_of(device: torch.device | str) -> str:
    """The tile table a device uses (the CPU interpreter runs CUDA's)."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return "npu" if kind == "npu" else "cuda"


def fp8_dot(device: torch.device) -> bool:
    """Whether tl.dot takes e4m3 operands here: CUDA from sm_89 (Ada, Hopper), and the CPU interpreter. Elsewhere
    FP8 weights are dequantized in the kernel (weight-only: sm_80), or at load (Ascend has no FP8 units)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
                torch.int64: "i64"}


def ptr(dtype: torch.dtype) -> str:
    return "*" + TRITON_TYPES[dtype]


@dataclass(frozen=True)
class Launch:
    """One kernel launch: grid, constexprs, the Triton type of every runtime argument (the compile check
    reads the types; a kernel argument without one is an error there, so they cannot drift apart) and compile
    options (num_warps, num_stages: tiles.Tile.options)."""

    kernel: Any
    grid: tuple[int, ...]
    constexprs: dict[str, Any]
    types: dict[str, str] = field(default_factory=dict)
    options: dict[str, int] = field(default_factory=dict)

    def __call__(self, *args: Any) -> None:
        if all(g > 0 for g in self.grid):
            self.kernel[self.grid](*args, **self.constexprs, **self.options)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    def key(self) -> tuple:
        """What makes a distinct compiled variant."""
        return (self.name, tuple(sorted(self.constexprs.items())), tuple(sorted(self.types.items())),
                tuple(sorted(self.options.items())))


def dot_mode(dtype: torch.dtype, target: str = "cuda") -> int:
    """float32 asks for exact (ieee) products, not tf32. Triton's CPU interpreter mishandles bfloat16 tl.dot, so
    there (tests only) bfloat16 tiles are multiplied in float32."""
    if dtype == torch.float32 and target == "cuda":
        return DOT_IEEE
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return DOT_UPCAST
    return DOT_DEFAULT


@triton.jit
def mma(a, b, MODE: tl.constexpr):
    if MODE == 1:
        return tl.dot(a, b, input_precision="ieee")
    if MODE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def row_offset(row, WIDTH: tl.constexpr):
    """Element offset of row `row` in a [rows, WIDTH] tensor, in 64 bits: row x WIDTH passes 2^31 in large
    caches and long prefills, where 32-bit offsets wrap."""
    return row.to(tl.int64) * WIDTH
