"""Basic layers. Parameters are created uninitialised: the loader (or dummy init) fills them.

A layer whose parameters are not one checkpoint tensor each (fused, stacked, sliced per rank, flattened
convolutions) says so in `checkpoint_plan`: the checkpoint tensors that fill each parameter, where they go in it,
and which part of each this rank reads. The loader walks the model and asks; it knows no layer names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kernels import ops
from ..kernels.quant import GROUP, QuantSpec, clamp_scale, token_scales
from ..parallel.layout import all_reduce_max


@dataclass(frozen=True)
class Piece:
    param: str | None  # our parameter name; None = another rank's tensor, not read here
    index: tuple = ()  # where in the parameter the checkpoint tensor goes
    src: tuple = ()  # which part of the checkpoint tensor this rank reads
    reshape: bool = False  # the tensor is a convolution held as the equivalent linear layer
    # 8-bit layers (model/quantization.py): how a scale or weight tensor becomes the parameter
    broadcast: bool = False  # one value (a per-tensor scale) for every row here
    expand: int = 1  # each row read fills this many rows here (128x128 block scales), cut to the rows here
    quantize: QuantSpec | None = None  # a float weight quantized while loading, its scales into scale_param
    scale_param: str | None = None
    reduce: str | None = None  # "max" (static FP8 input scales of fused parts) or "same" (they must agree)
    convert: str | None = None  # "deq_scale": msmodelslim's int64-held float32 scales
    zero: bool = False  # must be all zeros (msmodelslim's weight_offset: symmetric weights only)


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
        return ops.impl("linear", x.device)(x, self.weight, self.bias)

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


class QuantLinear(Linear):
    """A Linear layer held in 8 bits: weight [out, in] (fp8 or int8) and weight_scale [out, G] (kernels/quant.py),
    plus what its scheme needs (static input scale and offset, msmodelslim's quant_bias). Its checkpoint plan maps
    each scheme's tensors the way Linear maps the weight: stacked parts, this rank's rows or columns."""

    def __init__(self, in_features: int, out_features: int, quant, bias: bool = False,
                 parts: list[tuple[str, int, int | None]] | None = None, col_start: int | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.quant, self.spec = in_features, out_features, quant, quant.spec
        self.parts, self.col_start, self.flat = parts, col_start, False
        spec = quant.spec
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=spec.dtype), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, spec.groups(in_features), dtype=torch.float32),
                                         requires_grad=False)
        self.static_int8 = quant.msmodelslim and spec.act == "static"  # its quant_bias holds the float bias
        self.checkpoint_bias = bias
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias and not self.static_int8 \
            else None
        self.input_scale = self.input_offset = self.quant_bias = None
        if spec.act == "static":
            self.input_scale = nn.Parameter(torch.empty(1, dtype=torch.float32), requires_grad=False)
        if quant.msmodelslim and spec.act == "static":
            self.input_offset = nn.Parameter(torch.empty(1, dtype=torch.float32), requires_grad=False)
            self.quant_bias = nn.Parameter(torch.empty(out_features, dtype=torch.int32), requires_grad=False)
        for name, count, first in parts or [] if spec.group else []:
            if first is not None and (count % GROUP or first % GROUP):
                raise ConfigError(f"{name}: this rank's rows {first}..{first + count} cut a {GROUP}-row block of "
                                  "its FP8 block scales (a tensor-parallel split must keep whole blocks)")
        if col_start is not None and spec.group and (col_start % GROUP or in_features % GROUP):
            raise ConfigError(f"this rank's columns {col_start}..{col_start + in_features} cut a {GROUP}-column "
                              "block of the FP8 block scales (a tensor-parallel split must keep whole blocks)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token_scale = None
        if self.col_start is not None and self.spec.act == "token":  # this rank holds part of each token's row
            token_scale = clamp_scale(all_reduce_max(token_scales(x, self.spec)))
        return ops.impl("quant_linear", x.device)(x, self.weight, self.weight_scale, self.bias, self.spec,
                                                  self.input_scale, self.input_offset, self.quant_bias, token_scale)

    def checkpoint_plan(self, prefix: str) -> dict[str, Piece]:
        q, spec = self.quant, self.spec
        if q.online:  # float weights: quantized as they load
            return {name: replace(piece, quantize=spec, scale_param=f"{prefix}.weight_scale") if name.endswith(
                ".weight") else piece for name, piece in super().checkpoint_plan(prefix).items()}
        plan = super().checkpoint_plan(prefix)
        scale = "blocks" if spec.group else "scalar" if q.weight_strategy == "tensor" else "rows"
        leaves = [("weight_scale", "weight_scale", scale)]
        if self.static_int8:
            leaves = [("deq_scale", "weight_scale", "rows"), ("quant_bias", "quant_bias", "rows"),
                      ("input_scale", "input_scale", "same"), ("input_offset", "input_offset", "same"),
                      ("weight_scale", None, "skip"), ("weight_offset", None, "skip")]
            if self.checkpoint_bias:
                leaves.append(("bias", None, "skip"))
        elif q.msmodelslim:
            leaves.append(("weight_offset", None, "zero"))
        elif spec.act == "static":
            leaves.append(("input_scale", "input_scale", "max"))
        for leaf, param, layout in leaves:
            plan.update(self._pieces(prefix, leaf, param, layout))
        return plan

    def _pieces(self, prefix: str, leaf: str, param: str | None, layout: str) -> dict[str, Piece]:
        """One checkpoint leaf of each part (or of the whole layer) -> its piece of our parameter."""
        ours = f"{prefix}.{param}" if param else None
        block = GROUP if layout == "blocks" else 1
        parts = self.parts or [(prefix.rpartition(".")[2], self.out_features, None)]
        col = () if self.col_start is None or layout != "blocks" else cols(self.col_start // GROUP,
                                                                          self.in_features // GROUP)
        out, at = {}, 0
        for name, count, first in parts:
            source = f"{sibling(prefix, name)}.{leaf}" if self.parts else f"{prefix}.{leaf}"
            if layout == "skip":
                piece = SKIP
            elif layout in ("max", "same"):
                piece = Piece(ours, reduce=layout)
            elif layout == "zero":
                piece = Piece(ours, zero=True)
            elif layout == "scalar":
                piece = Piece(ours, rows(at, count), broadcast=True)
            else:
                src = rows(first // block, -(-count // block)) if first is not None else ()
                if col:
                    src = (src[0] if src else slice(None),) + col[1:]
                piece = Piece(ours, rows(at, count), src, reshape=True, expand=block,
                              convert="deq_scale" if leaf == "deq_scale" else None)
            out[source] = piece
            at += count
        return out


def make_linear(in_features: int, out_features: int, quant=None, bias: bool = False,
                parts: list[tuple[str, int, int | None]] | None = None, col_start: int | None = None) -> Linear:
    """A Linear layer, or its 8-bit form when the quantization plan gives the layer a scheme."""
    if quant is None:
        return Linear(in_features, out_features, bias=bias, parts=parts, col_start=col_start)
    return QuantLinear(in_features, out_features, quant, bias=bias, parts=parts, col_start=col_start)


class RMSNorm(nn.Module):
    """Normalises in fp32, casts back, then scales: the order transformers uses, so low-precision runs agree."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (norm(x + residual), x + residual) in one op (the decoder's residual add)."""
        if residual is None:
            return ops.impl("rms_norm", x.device)(x, self.weight, self.eps)
        return ops.impl("add_rms_norm", x.device)(x, residual, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one projection [gate | up]. With `start`, this
    rank holds the intermediate slice [start, start + intermediate) of a tensor-parallel MLP. `schemes` and
    `prefix` (our name of this module): 8-bit projections where the quantization plan says so."""

    def __init__(self, hidden: int, intermediate: int, start: int | None = None, schemes=None, prefix: str = ""):
        super().__init__()
        q = schemes or (lambda *names, **kw: None)
        self.gate_up_proj = make_linear(hidden, 2 * intermediate, q(f"{prefix}.gate_proj", f"{prefix}.up_proj"),
                                        parts=[("gate_proj", intermediate, start), ("up_proj", intermediate, start)])
        self.down_proj = make_linear(intermediate, hidden, q(f"{prefix}.down_proj"), col_start=start)

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
