"""The math that the model's layers and the kernels' torch twins share: RMSNorm and NeoX-style rotary. Plain
torch, no dependencies, computed in float32 or wider (float64 stays float64, so twins serve as references)."""

from __future__ import annotations

import torch


def wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, bias: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Normalise in float32 (or wider), cast back, then scale (and shift): transformers' order, so that
    low-precision runs agree with it."""
    xf = x.to(wide(x.dtype))
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if weight is not None:
        y = weight * y
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, rotary_dim]: rotates the first rotary_dim lanes (NeoX layout, halves
    paired) in float32 or wider; the other lanes pass through."""
    rd = cos.shape[-1]
    w = wide(x.dtype)
    rot = x[..., :rd].to(w)
    c, s = cos[:, None, :].to(w), sin[:, None, :].to(w)
    out = (rot * c + rotate_half(rot) * s).to(x.dtype)
    return torch.cat([out, x[..., rd:]], dim=-1) if rd < x.shape[-1] else out
