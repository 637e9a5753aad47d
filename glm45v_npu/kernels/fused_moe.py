"""Routed experts: tokens sorted by expert, one grouped matmul per expert, SwiGLU, weighted combine.

`fused_moe_torch` is the portable twin; it touches only the experts that received tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe_torch(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]; topk_* [T, K] -> [T, H]."""
    T, K = topk_ids.shape
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    token_of = order // K
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    xs = x[token_of]
    out = torch.empty(T * K, w2.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        gate, up = F.linear(xs[start : start + n], w13[e]).chunk(2, dim=-1)
        out[start : start + n] = F.linear(F.silu(gate) * up, w2[e]).float()
        start += n
    out *= topk_weights.flatten()[order, None].float()
    return torch.zeros(T, w2.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token_of, out).to(x.dtype)
