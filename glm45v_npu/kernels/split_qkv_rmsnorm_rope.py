"""Split a fused qkv projection into q, k, v; optionally RMSNorm each q/k head; rotary on the first lanes.

`split_qkv_rmsnorm_rope_torch` is the portable twin (and the CPU path); the Triton kernel shares its signature.
"""

from __future__ import annotations

import torch

from ..model.rope import apply_rope


def split_qkv_rmsnorm_rope_torch(
    qkv: torch.Tensor,
    sin: torch.Tensor,
    cos: torch.Tensor,
    q_size: int,
    kv_size: int,
    head_dim: int,
    eps: float | None = None,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = qkv.shape[0]
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(T, -1, head_dim)
    k = k.reshape(T, -1, head_dim)
    if eps is not None:
        q = _head_norm(q, eps, q_weight, q_bias)
        k = _head_norm(k, eps, k_weight, k_bias)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    return q.reshape(T, q_size), k.reshape(T, kv_size), v.contiguous()


def _head_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf.to(x.dtype)
    if weight is not None:
        y = weight * y
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)
