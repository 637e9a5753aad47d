"""Basic layers. Parameters are created uninitialised: the loader (or dummy init) fills them.

A layer whose parameters are not one checkpoint tensor each (fused, stacked, sliced per rank, flattened
convolutions) says so in `checkpoint_plan`: the checkpoint tensors that fill each parameter, where they go in it,
and which part of each this rank reads. The loader walks the model and asks; it knows no layer names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ops


@dataclass(frozen=True)
class Piece:
    param: str | None  # our parameter name; None = another rank's tensor, not read here
    index: tuple = ()  # where in the parameter the checkpoint tensor goes
    src: tuple = ()  # which part of the checkpoint tensor this rank reads
    reshape: bool = False  # the tensor is a convolution held as the equivalent linear layer


SKIP = Piece(None)


def rows(start: int, count: int) -> tuple:
    return (slice(start, start + count),)


def cols(start: int, count: int) -> tuple:
    return (slice(None), slice(start, start + count))


def sibling(prefix: str, name: str) -> str:
    """The name of `name` next to the module at `prefix` (a fused layer's checkpoint parts)."""
    base = prefix.rpartition(".")[0]
    return f"{base}.{name}" if base else name


class Linear(nn.Module):
    """y = x W^T (+ b). `parts`: the checkpoint tensors stacked into W's rows, as (name next to this layer, rows
    here, first row this rank reads or None for all; [] when another layer's tensor fills W, as with tied
    embeddings); `col_start`: this rank reads W's columns from there (a row-parallel layer); `flat`: W is a
    convolution's kernel, flattened."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 parts: list[tuple[str, int, int | None]] | None = None, col_start: int | None = None,
                 flat: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.parts, self.col_start, self.flat = parts, col_start, flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def checkpoint_plan(self, prefix: str) -> dict[str, Piece]:
        plan = {}
        for leaf in ("weight", "bias") if self.bias is not None else ("weight",):
            param = f"{prefix}.{leaf}"
            if self.parts is None:
                src = cols(self.col_start, self.in_features) if self.col_start is not None and leaf == "weight" else ()
                plan[param] = Piece(param, (), src, reshape=self.flat)
                continue
            at = 0
            for name, count, first in self.parts:
                plan[f"{sibling(prefix, name)}.{leaf}"] = Piece(param, rows(at, count),
                                                                rows(first, count) if first is not None else ())
                at += count
        return plan


class RMSNorm(nn.Module):
    """Normalises in fp32, casts back, then scales: the order transformers uses, so low-precision runs agree."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.impl("rms_norm", x.device)(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one projection [gate | up]. With `start`, this
    rank holds the intermediate slice [start, start + intermediate) of a tensor-parallel MLP."""

    def __init__(self, hidden: int, intermediate: int, start: int | None = None):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate,
                                   parts=[("gate_proj", intermediate, start), ("up_proj", intermediate, start)])
        self.down_proj = Linear(intermediate, hidden, col_start=start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Embedding(nn.Module):
    """Rows [start, start + num) of a (possibly vocab-parallel) table; ids outside give zeros, so the sum over
    ranks (an all-reduce) is the full lookup."""

    def __init__(self, num: int, dim: int, start: int = 0, partial: bool = False, real: int | None = None):
        super().__init__()
        self.start, self.partial = start, partial
        self.real = num if real is None else real  # rows that exist in the checkpoint (the rest is padding)
        self.weight = nn.Parameter(torch.empty(num, dim), requires_grad=False)

    def checkpoint_plan(self, prefix: str) -> dict[str, Piece]:
        param = f"{prefix}.weight"
        return {param: Piece(param, rows(0, self.real), rows(self.start, self.real) if self.partial else ())}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.partial:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        return F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * inside[:, None]
