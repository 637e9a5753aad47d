"""RMSNorm, and the residual add fused into it: one launch per norm where the twin takes six or seven.

The decoder adds each sublayer's output to the residual stream and normalises the sum for the next sublayer;
`add_rms_norm(x, residual, weight, eps) -> (norm(x + residual), x + residual)` does both in one pass over the row.
The math is the twins' (kernels/reference.py): the sum rounded to the activation dtype, normalised in float32, cast
back, then scaled, which is transformers' order.
"""

from __future__ import annotations

import torch

from .reference import rms_norm


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return rms_norm(s, weight, eps), s


try:
    import triton
    import triton.language as tl

    from ._triton import Launch, ptr, row_offset
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x, residual, weight, out, summed, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                         RESIDUAL: tl.constexpr):
        row = tl.program_id(0)
        at = row_offset(row, N)
        c = tl.arange(0, BLOCK)
        m = c < N
        v = tl.load(x + at + c, mask=m, other=0.0)
        if RESIDUAL:
            v = (v.to(tl.float32) + tl.load(residual + at + c, mask=m, other=0.0).to(tl.float32)).to(v.dtype)
            tl.store(summed + at + c, v, mask=m)
        vf = v.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(vf * vf, axis=0) / N + eps)
        y = (vf * rstd).to(v.dtype).to(tl.float32) * tl.load(weight + c, mask=m, other=0.0).to(tl.float32)
        tl.store(out + at + c, y.to(out.dtype.element_ty), mask=m)


def rms_norm_launch(rows: int, n: int, dtype: torch.dtype, weight_dtype: torch.dtype, residual: bool) -> Launch:
    return Launch(_rms_norm_kernel, (rows,), dict(N=n, BLOCK=triton.next_power_of_2(n), RESIDUAL=residual),
                  dict(x=ptr(dtype), residual=ptr(dtype), weight=ptr(weight_dtype), out=ptr(dtype),
                       summed=ptr(dtype), eps="fp32"))


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Same contract as the twin; rows of any leading shape. A norm without a weight, or with a bias (neither is
    in the decoder), takes the twin."""
    if weight is None or bias is not None:
        return rms_norm(x, weight, eps, bias)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(x2)
    rms_norm_launch(x2.shape[0], x2.shape[1], x.dtype, weight.dtype, False)(x2, x2, weight, out, out, eps)
    return out.view(x.shape)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    x, residual = x.contiguous(), residual.contiguous()
    out, summed = torch.empty_like(x), torch.empty_like(x)
    rms_norm_launch(x.shape[0], x.shape[1], x.dtype, weight.dtype, True)(x, residual, weight, out, summed, eps)
    return out, summed
