"""Causal attention of flat queries over the paged KV cache (the new tokens' K/V already stored).

The torch twin gathers each sequence's keys through its block table into a padded batch and runs SDPA with a
causal mask offset by the cached prefix; it serves prefill, chunked prefill and decode alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metadata import AttentionMetadata


def paged_attention_torch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, q_heads, head_dim] -> [T, q_heads, head_dim]."""
    _, nq, hd = q.shape
    B, max_q, max_k = meta.num_seqs, meta.max_query_len, meta.max_context_len
    bs = k_cache.shape[1]
    n_blocks = (max_k + bs - 1) // bs
    tables = meta.block_tables[:, :n_blocks].long()
    k = k_cache[tables].flatten(1, 2)[:, :max_k]  # [B, max_k, kvh, hd]
    v = v_cache[tables].flatten(1, 2)[:, :max_k]

    seq_of_tok, off_of_tok, mask = meta.padded_layout
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
# is BLOCK_N tokens wide; head_dim is padded to a power of two and masked. Decode: one program per (sequence,
# kv head, split) serves the whole GQA group (padded to 16 rows for tl.dot); a sequence's keys are cut into SPLITS
# equal runs on the device (so the longest context is never a constexpr and no step recompiles), then a
# log-sum-exp reduction joins the runs. Offsets into the cache and the flat batch are 64-bit.

try:
    import triton
    import triton.language as tl

    from ._triton import MAX_SPLITS, Launch, dot_mode, ptr, row_offset, target_of
    from ._triton import mma as _dot
    from .tiles import DECODE, fixed, of, prefill_tile
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _kv_rows(table, n, valid, kvh, BS: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr):
        """Cache offsets of token positions n of one sequence, through its block table (keys and values alike)."""
        blk = tl.load(table + n // BS, mask=valid, other=0)
        return row_offset(blk * BS + n % BS, NKV * HD) + kvh * HD

    @triton.jit(do_not_specialize=["bt_stride"])
    def _decode_kernel(
        q, k_cache, v_cache, block_tables, ctx_lens, out_part, lse_part, scale, bt_stride,
        G: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr, NKV: tl.constexpr,
        BS: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, DOT: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        ctx = tl.load(ctx_lens + b)
        per = tl.cdiv(tl.cdiv(ctx, BLOCK_N), SPLITS) * BLOCK_N  # this sequence's keys per split
        start = s * per
        end = tl.minimum(start + per, ctx)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HD_PAD)
        dm = d < HD
        gm = g < G
        qh = kvh * G + g
        qv = tl.load(q + row_offset(b, NKV * G * HD) + qh[:, None] * HD + d[None, :], mask=gm[:, None] & dm[None, :],
                     other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        den = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, HD_PAD], tl.float32)
        table = block_tables + b.to(tl.int64) * bt_stride
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid = n < end
            row = _kv_rows(table, n, valid, kvh, BS, NKV, HD)
            tm = valid[:, None] & dm[None, :]
            kk = tl.load(k_cache + row[:, None] + d[None, :], mask=tm, other=0.0)
            sc = _dot(qv, tl.trans(kk.to(qv.dtype)), DOT)
            sc = tl.where(valid[None, :], sc * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            p = tl.exp(sc - m_new[:, None])
            alpha = tl.exp(m - m_new)
            den = den * alpha + tl.sum(p, axis=1)
            vv = tl.load(v_cache + row[:, None] + d[None, :], mask=tm, other=0.0)  # k and v are never live together
            acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, DOT)
            m = m_new
        has = den > 0
        out = tl.where(has[:, None], acc / tl.where(has, den, 1.0)[:, None], 0.0)
        lse = tl.where(has, m + tl.log(tl.where(has, den, 1.0)), float("-inf"))
        base = (b.to(tl.int64) * (NKV * G) + qh) * SPLITS + s
        tl.store(out_part + base[:, None] * HD + d[None, :], out, mask=gm[:, None] & dm[None, :])
        tl.store(lse_part + base, lse, mask=gm)

    @triton.jit
    def _reduce_splits_kernel(out_part, lse_part, out, HD: tl.constexpr, HD_PAD: tl.constexpr,
                              SPLITS: tl.constexpr, S_PAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # sequence * q_heads + head
        s = tl.arange(0, S_PAD)
        sm = s < SPLITS
        lse = tl.load(lse_part + row * SPLITS + s, mask=sm, other=float("-inf"))
        mx = tl.max(lse, axis=0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # an empty row (a padding row of a graph) gives zeros
        w = tl.where(sm, tl.exp(lse - mx), 0.0)
        w = w / tl.maximum(tl.sum(w, axis=0), 1e-30)
        d = tl.arange(0, HD_PAD)
        dm = d < HD
        parts = tl.load(out_part + (row * SPLITS + s)[:, None] * HD + d[None, :], mask=sm[:, None] & dm[None, :],
                        other=0.0)
        tl.store(out + row * HD + d, tl.sum(w[:, None] * parts, axis=0).to(out.dtype.element_ty), mask=dm)

    @triton.jit(do_not_specialize=["bt_stride"])
    def _prefill_kernel(
        q, k_cache, v_cache, block_tables, ctx_lens, cu_q, out, scale, bt_stride,
        G: tl.constexpr, HD: tl.constexpr, HD_PAD: tl.constexpr, NKV: tl.constexpr, BS: tl.constexpr,
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
        d = tl.arange(0, HD_PAD)
        dm = d < HD
        NQ: tl.constexpr = NKV * G
        rows = row_offset(q0 + mi, NQ * HD) + h * HD
        qv = tl.load(q + rows[:, None] + d[None, :], mask=mm[:, None] & dm[None, :], other=0.0)
        q_pos = prefix + mi
        end = tl.minimum(ctx, prefix + (mb + 1) * BLOCK_M)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HD_PAD], tl.float32)
        table = block_tables + b.to(tl.int64) * bt_stride
        for n0 in range(0, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid = n < end
            row = _kv_rows(table, n, valid, kvh, BS, NKV, HD)
            tile = row[:, None] + d[None, :]
            tm = valid[:, None] & dm[None, :]
            kk = tl.load(k_cache + tile, mask=tm, other=0.0)
            sc = _dot(qv, tl.trans(kk.to(qv.dtype)), DOT) * scale
            ok = valid[None, :] & (n[None, :] <= q_pos[:, None])
            sc = tl.where(ok, sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sc - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            den = den * alpha + tl.sum(p, axis=1)
            vv = tl.load(v_cache + tile, mask=tm, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, DOT)
            m = m_new
        o = acc / tl.where(den > 0, den, 1.0)[:, None]
        tl.store(out + rows[:, None] + d[None, :], o.to(out.dtype.element_ty), mask=mm[:, None] & dm[None, :])


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def decode_splits(batch: int, num_kv_heads: int, target: str = "cuda") -> int:
    """Split-K programs per (sequence, kv head): enough programs to fill the device at this batch (a power of two,
    so a batch bucket has one value), never more than MAX_SPLITS."""
    want = -(-fixed(target)["decode_programs"] // max(1, batch * num_kv_heads))
    return max(1, min(MAX_SPLITS, triton.next_power_of_2(want)))


def decode_launches(batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype, cache_dtype: torch.dtype, target: str = "cuda") -> tuple[Launch, Launch]:
    """The split-K decode kernel and its reduction, for `batch` sequences (a graph's bucket, or the batch)."""
    G = num_q_heads // num_kv_heads
    g_pad = max(triton.next_power_of_2(G), 16)  # tl.dot needs 16 rows; a [G, BLOCK_N, HD] broadcast overflows UB
    splits = decode_splits(batch, num_kv_heads, target)
    hd_pad = triton.next_power_of_2(head_dim)
    tile = of(DECODE, target, _name(dtype))
    decode = Launch(
        _decode_kernel, (batch, num_kv_heads, splits),
        dict(G=G, G_PAD=g_pad, HD=head_dim, HD_PAD=hd_pad, NKV=num_kv_heads, BS=block_size,
             BLOCK_N=tile.block_n, SPLITS=splits, DOT=dot_mode(dtype, target)),
        dict(q=ptr(dtype), k_cache=ptr(cache_dtype), v_cache=ptr(cache_dtype), block_tables=ptr(torch.int32),
             ctx_lens=ptr(torch.int32), out_part=ptr(torch.float32), lse_part=ptr(torch.float32), scale="fp32",
             bt_stride="i32"), tile.options(target))
    reduce = Launch(
        _reduce_splits_kernel, (batch * num_q_heads,),
        dict(HD=head_dim, HD_PAD=hd_pad, SPLITS=splits, S_PAD=triton.next_power_of_2(splits)),
        dict(out_part=ptr(torch.float32), lse_part=ptr(torch.float32), out=ptr(dtype)))
    return decode, reduce


def prefill_launch(num_seqs: int, max_query_len: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                   block_size: int, dtype: torch.dtype, cache_dtype: torch.dtype, target: str = "cuda") -> Launch:
    t = prefill_tile(target, max_query_len, _name(dtype))
    return Launch(
        _prefill_kernel, (-(-max_query_len // t.block_m), num_seqs, num_q_heads),
        dict(G=num_q_heads // num_kv_heads, HD=head_dim, HD_PAD=triton.next_power_of_2(head_dim), NKV=num_kv_heads,
             BS=block_size, BLOCK_M=t.block_m, BLOCK_N=t.block_n, DOT=dot_mode(dtype, target)),
        dict(q=ptr(dtype), k_cache=ptr(cache_dtype), v_cache=ptr(cache_dtype), block_tables=ptr(torch.int32),
             ctx_lens=ptr(torch.int32), cu_q=ptr(torch.int32), out=ptr(dtype), scale="fp32", bt_stride="i32"),
        t.options(target))


def paged_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Same contract as the twin. Decode batches take the split-K kernel, all others the varlen kernel."""
    _, nq, hd = q.shape
    nkv, bs = k_cache.shape[2], k_cache.shape[1]
    target = target_of(q.device)
    q = q.contiguous()
    out = torch.empty_like(q)
    bt = meta.block_tables
    if meta.is_decode:
        B = meta.num_seqs
        decode, reduce = decode_launches(B, nq, nkv, hd, bs, q.dtype, k_cache.dtype, target)
        splits = decode.constexprs["SPLITS"]
        out_part = torch.empty(B, nq, splits, hd, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, nq, splits, dtype=torch.float32, device=q.device)
        decode(q, k_cache, v_cache, bt, meta.context_lens, out_part, lse_part, scale, bt.stride(0))
        reduce(out_part, lse_part, out)
        return out
    launch = prefill_launch(meta.num_seqs, meta.max_query_len, nq, nkv, hd, bs, q.dtype, k_cache.dtype, target)
    launch(q, k_cache, v_cache, bt, meta.context_lens, meta.cu_seqlens_q, out, scale, bt.stride(0))
    return out
