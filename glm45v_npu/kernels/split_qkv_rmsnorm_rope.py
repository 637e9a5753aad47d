"""The conditional fused decode op: split a fused qkv projection into q, k, v; RMSNorm each q/k head only when
the checkpoint has QK norm (eps given); rotary on the first rotary_dim lanes of q and k.

`split_qkv_rmsnorm_rope_torch` is the portable twin (and the CPU path); the Triton kernel shares its signature;
ops.py picks one per device (ops.impl("split_qkv_rmsnorm_rope", device)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .reference import apply_rope, rms_norm


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
    *,
    norm: Callable = rms_norm,
    rope: Callable = apply_rope,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, q_size + 2 kv_size]; sin, cos [T, rotary_dim] -> q [T, q_size], k, v [T, kv_size], contiguous.
    With eps None every norm argument is ignored and no norm is applied (GLM-4.5V); with eps, q and k heads are
    RMS-normalised, then scaled by q_weight / k_weight and shifted by q_bias / k_bias where given. `norm` and
    `rope` default to the reference math; prefill passes the device's own ops (ops.split_qkv_plain)."""
    T = qkv.shape[0]
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(T, -1, head_dim)
    k = k.reshape(T, -1, head_dim)
    if eps is not None:
        q = norm(q, q_weight, eps, q_bias)
        k = norm(k, k_weight, eps, k_bias)
    q = rope(q, cos, sin)
    k = rope(k, cos, sin)
    return q.reshape(T, q_size), k.reshape(T, kv_size), v.contiguous()


# --- Triton -------------------------------------------------------------------------------------------------
# One program per (token, chunk of heads): chunks of q heads, then k heads, then v heads, each a [HEADS, HD]
# tile (head_dim padded to a power of two and masked). Only portable Triton: loads, stores, reductions, math.

try:
    import triton
    import triton.language as tl

    from ._triton import Launch, ptr, row_offset, target_of
    from .tiles import fixed
except ImportError:  # CPU-only installs without triton run the twin
    triton = None

if triton is not None:

    @triton.jit
    def _norm_rope_heads(src, dst, h0, NH, w, b, cos, sin, eps, HD: tl.constexpr, HD_PAD: tl.constexpr,
                         RD: tl.constexpr, HEADS: tl.constexpr, NORM: tl.constexpr, BIAS: tl.constexpr,
                         ROPE: tl.constexpr):
        h = h0 + tl.arange(0, HEADS)
        lane = tl.arange(0, HD_PAD)
        lm = lane < HD
        m = (h < NH)[:, None] & lm[None, :]
        at = h[:, None] * HD + lane[None, :]
        x = tl.load(src + at, mask=m, other=0.0).to(tl.float32)
        if ROPE:
            half: tl.constexpr = RD // 2
            partner = tl.where(lane < half, lane + half, tl.where(lane < RD, lane - half, lane))
            xp = tl.load(src + h[:, None] * HD + partner[None, :], mask=m, other=0.0).to(tl.float32)
            if NORM:
                r = tl.rsqrt(tl.sum(x * x, axis=1) / HD + eps)[:, None]
                x = x * r * tl.load(w + lane, mask=lm, other=0.0).to(tl.float32)[None, :]
                xp = xp * r * tl.load(w + partner, mask=lm, other=0.0).to(tl.float32)[None, :]
                if BIAS:
                    x = x + tl.load(b + lane, mask=lm, other=0.0).to(tl.float32)[None, :]
                    xp = xp + tl.load(b + partner, mask=lm, other=0.0).to(tl.float32)[None, :]
            rot = lane < RD
            c = tl.load(cos + lane, mask=rot, other=1.0).to(tl.float32)[None, :]
            s = tl.load(sin + lane, mask=rot, other=0.0).to(tl.float32)[None, :]
            sign = tl.where(lane < half, -1.0, 1.0)[None, :]
            x = tl.where(rot[None, :], x * c + sign * xp * s, x)
        tl.store(dst + at, x.to(dst.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["eps"])
    def _split_qkv_rmsnorm_rope_kernel(
        qkv, cos, sin, q_out, k_out, v_out, q_w, k_w, q_b, k_b, eps, qkv_stride, cs_stride,
        NQ: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr, RD: tl.constexpr,
        HEADS: tl.constexpr, NORM: tl.constexpr, Q_BIAS: tl.constexpr, K_BIAS: tl.constexpr,
    ):
        t = tl.program_id(0)
        c = tl.program_id(1)
        QC: tl.constexpr = (NQ + HEADS - 1) // HEADS
        KC: tl.constexpr = (NKV + HEADS - 1) // HEADS
        src = qkv + t.to(tl.int64) * qkv_stride
        cs = t.to(tl.int64) * cs_stride
        if c < QC:
            _norm_rope_heads(src, q_out + row_offset(t, NQ * HD), c * HEADS, NQ, q_w, q_b, cos + cs, sin + cs, eps,
                             HD, HD_PAD, RD, HEADS, NORM, Q_BIAS, True)
        elif c < QC + KC:
            _norm_rope_heads(src + NQ * HD, k_out + row_offset(t, NKV * HD), (c - QC) * HEADS, NKV, k_w, k_b,
                             cos + cs, sin + cs, eps, HD, HD_PAD, RD, HEADS, NORM, K_BIAS, True)
        else:
            _norm_rope_heads(src + (NQ + NKV) * HD, v_out + row_offset(t, NKV * HD), (c - QC - KC) * HEADS, NKV,
                             k_w, k_b, cos + cs, sin + cs, eps, HD, HD_PAD, RD, HEADS, False, False, False)


def split_qkv_launch(T: int, num_q_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int,
                     dtype: torch.dtype, norm: bool, q_bias: bool, k_bias: bool, target: str = "cuda",
                     rope_dtype: torch.dtype = torch.float32) -> Launch:
    heads = min(fixed(target)["split_heads"], triton.next_power_of_2(max(num_q_heads, num_kv_heads)))
    chunks = triton.cdiv(num_q_heads, heads) + 2 * triton.cdiv(num_kv_heads, heads)
    t = ptr(dtype)
    return Launch(
        _split_qkv_rmsnorm_rope_kernel, (T, chunks),
        dict(NQ=num_q_heads, NKV=num_kv_heads, HD=head_dim, HD_PAD=triton.next_power_of_2(head_dim), RD=rotary_dim,
             HEADS=heads, NORM=norm, Q_BIAS=norm and q_bias, K_BIAS=norm and k_bias),
        dict(qkv=t, cos=ptr(rope_dtype), sin=ptr(rope_dtype), q_out=t, k_out=t, v_out=t, q_w=t, k_w=t, q_b=t, k_b=t,
             eps="fp32",
             qkv_stride="i32", cs_stride="i32"))


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
    q = qkv.new_empty(T, q_size)
    k = qkv.new_empty(T, kv_size)
    v = qkv.new_empty(T, kv_size)
    norm = eps is not None
    if norm:  # a norm without a weight scales by one
        q_weight = q_weight if q_weight is not None else qkv.new_ones(head_dim)
        k_weight = k_weight if k_weight is not None else qkv.new_ones(head_dim)
    launch = split_qkv_launch(T, q_size // head_dim, kv_size // head_dim, head_dim, cos.shape[-1], qkv.dtype, norm,
                              q_bias is not None, k_bias is not None, target_of(qkv.device), cos.dtype)
    absent = qkv  # never read: the constexpr flags are off
    launch(qkv, cos, sin, q, k, v, q_weight if norm else absent, k_weight if norm else absent,
           q_bias if norm and q_bias is not None else absent, k_bias if norm and k_bias is not None else absent,
           eps if norm else 0.0, qkv.stride(0), cos.stride(0))
    return q, k, v
