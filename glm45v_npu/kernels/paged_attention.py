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
    T, nq, hd = q.shape
    B, max_q, max_k = ctx.num_seqs, ctx.max_query_len, ctx.max_context_len
    bs = ctx.block_size
    n_blocks = (max_k + bs - 1) // bs
    tables = ctx.block_tables[:, :n_blocks].long()
    k = k_cache[tables].flatten(1, 2)[:, :max_k]  # [B, max_k, kvh, hd]
    v = v_cache[tables].flatten(1, 2)[:, :max_k]

    dev = q.device
    q_lens = torch.tensor(ctx.query_lens, device=dev)
    seq_of_tok = torch.repeat_interleave(torch.arange(B, device=dev), q_lens)
    off_of_tok = torch.arange(T, device=dev) - ctx.cu_seqlens_q[:-1].long()[seq_of_tok]
    qp = q.new_zeros(B, max_q, nq, hd)
    qp[seq_of_tok, off_of_tok] = q

    ctx_lens = ctx.context_lens_t.long()
    q_pos = (ctx_lens - q_lens)[:, None] + torch.arange(max_q, device=dev)  # absolute position of each query
    k_pos = torch.arange(max_k, device=dev)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, max_q, max_k]; also bounds keys by context length

    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2),
        k.transpose(1, 2).to(q.dtype),
        v.transpose(1, 2).to(q.dtype),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)[seq_of_tok, off_of_tok]
