"""Shared Triton helpers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DOT_DEFAULT, DOT_IEEE, DOT_UPCAST = 0, 1, 2


def dot_mode(dtype: torch.dtype) -> int:
    """float32 asks for exact (ieee) products, not tf32. Triton's CPU interpreter mishandles bfloat16 tl.dot, so
    there (tests only) bfloat16 tiles are multiplied in float32."""
    if dtype == torch.float32:
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
