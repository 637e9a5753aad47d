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
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf.to(x.dtype)
    if weight is not None:
        y = weight * y
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


# --- Triton -------------------------------------------------------------------------------------------------
# One program per (token, head) over q heads, then k heads, then v heads. Only portable Triton (loads, stores,
# reductions, math): it compiles for CUDA Triton and for triton-ascend alike.

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton run the twin
    triton = None

if triton is not None:

    @triton.jit
    def _split_qkv_rmsnorm_rope_kernel(
        qkv, cos, sin, q_out, k_out, v_out, q_w, k_w, q_b, k_b, eps,
        qkv_stride, cs_stride,
        NQ: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, RD: tl.constexpr,
        HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        lane = tl.arange(0, HD)
        src = qkv + t * qkv_stride + h * HD
        x = tl.load(src + lane).to(tl.float32)
        if h >= NQ + NKV:  # v: plain copy
            tl.store(v_out + t * NKV * HD + (h - NQ - NKV) * HD + lane, x.to(v_out.dtype.element_ty))
            return
        half: tl.constexpr = RD // 2
        partner = tl.where(lane < half, lane + half, tl.where(lane < RD, lane - half, lane))
        xp = tl.load(src + partner).to(tl.float32)
        if HAS_NORM:
            r = tl.rsqrt(tl.sum(x * x, axis=0) / HD + eps)
            if h < NQ:
                w, wp = tl.load(q_w + lane).to(tl.float32), tl.load(q_w + partner).to(tl.float32)
            else:
                w, wp = tl.load(k_w + lane).to(tl.float32), tl.load(k_w + partner).to(tl.float32)
            x, xp = x * r * w, xp * r * wp
            if HAS_BIAS:
                if h < NQ:
                    x, xp = x + tl.load(q_b + lane).to(tl.float32), xp + tl.load(q_b + partner).to(tl.float32)
                else:
                    x, xp = x + tl.load(k_b + lane).to(tl.float32), xp + tl.load(k_b + partner).to(tl.float32)
        rot = lane < RD
        c = tl.load(cos + t * cs_stride + lane, mask=rot, other=1.0).to(tl.float32)
        s = tl.load(sin + t * cs_stride + lane, mask=rot, other=0.0).to(tl.float32)
        sign = tl.where(lane < half, -1.0, 1.0)
        y = tl.where(rot, x * c + sign * xp * s, x)
        if h < NQ:
            tl.store(q_out + t * NQ * HD + h * HD + lane, y.to(q_out.dtype.element_ty))
        else:
            tl.store(k_out + t * NKV * HD + (h - NQ) * HD + lane, y.to(k_out.dtype.element_ty))


def split_qkv_rmsnorm_rope_triton(
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
    nq, nkv = q_size // head_dim, kv_size // head_dim
    q = qkv.new_empty(T, q_size)
    k = qkv.new_empty(T, kv_size)
    v = qkv.new_empty(T, kv_size)
    if T == 0:
        return q, k, v
    has_norm = eps is not None
    has_bias = has_norm and q_bias is not None
    dummy = qkv  # never read when the constexpr flags are off
    _split_qkv_rmsnorm_rope_kernel[(T, nq + 2 * nkv)](
        qkv, cos, sin, q, k, v,
        q_weight if has_norm else dummy, k_weight if has_norm else dummy,
        q_bias if has_bias else dummy, k_bias if has_bias else dummy,
        eps if has_norm else 0.0,
        qkv.stride(0), cos.stride(0),
        NQ=nq, NKV=nkv, HD=head_dim, RD=cos.shape[-1], HAS_NORM=has_norm, HAS_BIAS=has_bias,
    )
    return q, k, v
