"""Causal attention of flat queries over the paged KV cache (the new tokens' K/V already stored).

The torch twin gathers each sequence's keys through its block table into a padded batch and runs SDPA with a
causal mask offset by the cached prefix; it serves prefill, chunked prefill and decode alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..context import ForwardContext


def paged_attention_torch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: ForwardContext, scale: float
) -> torch.Tensor:
    """q [T, q_heads, head_dim] -> [T, q_heads, head_dim]."""
    _, nq, hd = q.shape
    B, max_q, max_k = ctx.num_seqs, ctx.max_query_len, ctx.max_context_len
    bs = ctx.block_size
    n_blocks = (max_k + bs - 1) // bs
    tables = ctx.block_tables[:, :n_blocks].long()
    k = k_cache[tables].flatten(1, 2)[:, :max_k]  # [B, max_k, kvh, hd]
    v = v_cache[tables].flatten(1, 2)[:, :max_k]

    seq_of_tok, off_of_tok, mask = ctx.padded_layout
    qp = q.new_zeros(B, max_q, nq, hd)
    qp[seq_of_tok, off_of_tok] = q

    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2),
        k.transpose(1, 2).to(q.dtype),
        v.transpose(1, 2).to(q.dtype),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)[seq_of_tok, off_of_tok]


# --- Triton ---------------------------------------------------------------------------------------------------
# Keys and values are gathered token by token through the block table, so any block size works and every tile
# is BLOCK_N tokens wide. Decode: one program per (sequence, kv head, split) serves the whole GQA group (any
# group size, padded to a power of two), split-K over long contexts, then a log-sum-exp reduction.

try:
    import triton
    import triton.language as tl

    from ._triton import dot_mode
    from ._triton import mma as _dot
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _kv_tile(k_cache, v_cache, table, n, valid, kvh, d, BS: tl.constexpr, NKV: tl.constexpr,
                 HD: tl.constexpr):
        """Keys and values of token positions n of one sequence, gathered through its block table."""
        blk = tl.load(table + n // BS, mask=valid, other=0)
        row = (blk * BS + n % BS) * (NKV * HD) + kvh * HD
        kk = tl.load(k_cache + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        vv = tl.load(v_cache + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        return kk, vv

    @triton.jit
    def _decode_kernel(
        q, k_cache, v_cache, block_tables, ctx_lens, out_part, lse_part, scale, bt_stride,
        G: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, NKV: tl.constexpr, BS: tl.constexpr,
        BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr, USE_DOT: tl.constexpr,
        DOT: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        ctx = tl.load(ctx_lens + b)
        start = s * CHUNK
        end = tl.minimum(start + CHUNK, ctx)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HD)
        gm = g < G
        qh = kvh * G + g
        qv = tl.load(q + b * (NKV * G * HD) + qh[:, None] * HD + d[None, :], mask=gm[:, None], other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        den = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, HD], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid = n < end
            kk, vv = _kv_tile(k_cache, v_cache, block_tables + b * bt_stride, n, valid, kvh, d, BS, NKV, HD)
            if USE_DOT:
                sc = _dot(qv, tl.trans(kk.to(qv.dtype)), DOT)
            else:
                sc = tl.sum(qv.to(tl.float32)[:, None, :] * kk.to(tl.float32)[None, :, :], axis=2)
            sc = tl.where(valid[None, :], sc * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            p = tl.exp(sc - m_new[:, None])
            alpha = tl.exp(m - m_new)
            den = den * alpha + tl.sum(p, axis=1)
            if USE_DOT:
                pv = _dot(p.to(vv.dtype), vv, DOT)
            else:
                pv = tl.sum(p[:, :, None] * vv.to(tl.float32)[None, :, :], axis=1)
            acc = acc * alpha[:, None] + pv
            m = m_new
        has = den > 0
        out = tl.where(has[:, None], acc / tl.where(has, den, 1.0)[:, None], 0.0)
        lse = tl.where(has, m + tl.log(tl.where(has, den, 1.0)), float("-inf"))
        base = (b * (NKV * G) + qh) * SPLITS + s
        tl.store(out_part + base[:, None] * HD + d[None, :], out, mask=gm[:, None])
        tl.store(lse_part + base, lse, mask=gm)

    @triton.jit
    def _reduce_splits_kernel(out_part, lse_part, out, HD: tl.constexpr, SPLITS: tl.constexpr,
                              S_PAD: tl.constexpr):
        row = tl.program_id(0)  # sequence * q_heads + head
        s = tl.arange(0, S_PAD)
        sm = s < SPLITS
        lse = tl.load(lse_part + row * SPLITS + s, mask=sm, other=float("-inf"))
        mx = tl.max(lse, axis=0)
        w = tl.where(sm, tl.exp(lse - mx), 0.0)
        w = w / tl.sum(w, axis=0)
        d = tl.arange(0, HD)
        parts = tl.load(out_part + (row * SPLITS + s)[:, None] * HD + d[None, :], mask=sm[:, None], other=0.0)
        tl.store(out + row * HD + d, tl.sum(w[:, None] * parts, axis=0).to(out.dtype.element_ty))

    @triton.jit
    def _prefill_kernel(
        q, k_cache, v_cache, block_tables, ctx_lens, cu_q, out, scale, bt_stride,
        G: tl.constexpr, HD: tl.constexpr, NKV: tl.constexpr, BS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
    ):
        mb = tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2)
        kvh = h // G
        q0 = tl.load(cu_q + b)
        q_len = tl.load(cu_q + b + 1) - q0
        if mb * BLOCK_M >= q_len:
            return
        ctx = tl.load(ctx_lens + b)
        prefix = ctx - q_len
        mi = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mm = mi < q_len
        d = tl.arange(0, HD)
        NQ: tl.constexpr = NKV * G
        qv = tl.load(q + (q0 + mi)[:, None] * (NQ * HD) + h * HD + d[None, :], mask=mm[:, None], other=0.0)
        q_pos = prefix + mi
        end = tl.minimum(ctx, prefix + (mb + 1) * BLOCK_M)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HD], tl.float32)
        for n0 in range(0, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid = n < end
            kk, vv = _kv_tile(k_cache, v_cache, block_tables + b * bt_stride, n, valid, kvh, d, BS, NKV, HD)
            sc = _dot(qv, tl.trans(kk.to(qv.dtype)), DOT) * scale
            ok = valid[None, :] & (n[None, :] <= q_pos[:, None])
            sc = tl.where(ok, sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sc - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            den = den * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, DOT)
            m = m_new
        o = acc / tl.where(den > 0, den, 1.0)[:, None]
        tl.store(out + (q0 + mi)[:, None] * (NQ * HD) + h * HD + d[None, :], o.to(out.dtype.element_ty),
                 mask=mm[:, None])


SPLIT_TOKENS = 256  # keys per split-K program in decode


def paged_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: ForwardContext, scale: float
) -> torch.Tensor:
    """Same contract as the twin. Decode batches take the split-K kernel, all others the varlen kernel."""
    _, nq, hd = q.shape
    nkv, bs = k_cache.shape[2], k_cache.shape[1]
    G = nq // nkv
    q = q.contiguous()
    out = torch.empty_like(q)
    ieee = dot_mode(q.dtype)
    if ctx.is_decode:
        B = ctx.num_seqs
        splits = max(1, min(16, -(-ctx.max_context_len // SPLIT_TOKENS)))
        chunk = -(-ctx.max_context_len // splits)
        g_pad = max(triton.next_power_of_2(G), 1)
        out_part = torch.empty(B, nq, splits, hd, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, nq, splits, dtype=torch.float32, device=q.device)
        _decode_kernel[(B, nkv, splits)](
            q, k_cache, v_cache, ctx.block_tables, ctx.context_lens_t, out_part, lse_part, scale,
            ctx.block_tables.stride(0), G=G, G_PAD=g_pad, HD=hd, NKV=nkv, BS=bs, BLOCK_N=32, CHUNK=chunk,
            SPLITS=splits, USE_DOT=g_pad >= 16, DOT=ieee,
        )
        _reduce_splits_kernel[(B * nq,)](out_part, lse_part, out, HD=hd, SPLITS=splits,
                                         S_PAD=triton.next_power_of_2(splits))
        return out
    block_m = 16
    grid = (-(-ctx.max_query_len // block_m), ctx.num_seqs, nq)
    _prefill_kernel[grid](
        q, k_cache, v_cache, ctx.block_tables, ctx.context_lens_t, ctx.cu_seqlens_q, out, scale,
        ctx.block_tables.stride(0), G=G, HD=hd, NKV=nkv, BS=bs, BLOCK_M=block_m, BLOCK_N=32, DOT=ieee,
    )
    return out
