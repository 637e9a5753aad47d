"""Routed experts: tokens sorted by expert, one grouped matmul per expert, SwiGLU, weighted combine.

`fused_moe_torch` is the portable twin; it touches only the experts that received tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe_torch(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]; topk_* [T, K] -> [T, H].
    Pairs whose expert id is E or more belong to another rank and are skipped."""
    T, K = topk_ids.shape
    E = w13.shape[0]
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    token_of = order // K
    counts = torch.bincount(flat.clamp(max=E), minlength=E).tolist()[:E]
    xs = x[token_of]
    wide = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(T * K, w2.shape[1], dtype=wide, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        gate, up = F.linear(xs[start : start + n], w13[e]).chunk(2, dim=-1)
        out[start : start + n] = F.linear(F.silu(gate) * up, w2[e]).to(wide)
        start += n
    out *= topk_weights.flatten()[order, None].to(wide)
    return torch.zeros(T, w2.shape[1], dtype=wide, device=x.device).index_add_(0, token_of, out).to(x.dtype)


# --- Triton ---------------------------------------------------------------------------------------------------
# (token, k) pairs are sorted by expert on the device and each expert's run padded to BLOCK_M rows, without a
# host sync (the grid is sized for the worst case and empty tiles exit). Kernel 1: one tile of rows of one expert
# times its gate and up columns, SwiGLU. Kernel 2: times down, scaled by the routing weight. Then a sum over k.

try:
    import triton
    import triton.language as tl

    from ._triton import Launch, dot_mode, ptr, target_of, tiles
    from ._triton import mma as _dot
except ImportError:
    triton = None


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> rows [TK + E*(block_m-1)] (index into the flat (token, k) pairs, TK = padding) and the expert of each
    block_m-row tile (-1 = unused tile). Shapes depend only on TK and E, and nothing waits for the device
    (no boolean indexing, no .item()), so it runs inside a captured graph."""
    flat = topk_ids.flatten().clamp(max=num_experts)  # ids >= num_experts: another rank's, never placed
    tk = flat.numel()
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts = counts.scatter_add_(0, flat, torch.ones_like(flat))[:num_experts]  # bincount would sync
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = flat.argsort(stable=True)
    expert_sorted = flat[order]
    mine = expert_sorted < num_experts
    e = expert_sorted.clamp(max=num_experts - 1)
    rank = torch.arange(tk, device=flat.device) - (counts.cumsum(0) - counts)[e]
    capacity = tk + num_experts * (block_m - 1)
    dest = torch.where(mine, starts[e] + rank, capacity)  # other ranks' pairs go to a slot cut off below
    rows = torch.full((capacity + 1,), tk, dtype=torch.int64, device=flat.device)
    rows.scatter_(0, dest, order)
    tile_start = torch.arange(0, capacity, block_m, device=flat.device)
    tile_expert = torch.searchsorted(ends, tile_start, right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1)
    return rows[:capacity], tile_expert


if triton is not None:

    @triton.jit(do_not_specialize=["TK"])
    def _gate_up_kernel(x, w13, rows, tile_expert, h, TK, H: tl.constexpr, INTER: tl.constexpr, K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        tile = tl.program_id(0)
        nb = tl.program_id(1)
        e = tl.load(tile_expert + tile)
        if e < 0:
            return
        r = tl.load(rows + tile * BLOCK_M + tl.arange(0, BLOCK_M))
        rm = r < TK
        tok = r // K
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < INTER
        gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        w_e = w13 + e.to(tl.int64) * (2 * INTER * H)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < H
            a = tl.load(x + tok[:, None] * H + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            wg = tl.load(w_e + n[None, :] * H + kk[:, None], mask=nm[None, :] & km[:, None], other=0.0)
            wu = tl.load(w_e + (n[None, :] + INTER) * H + kk[:, None], mask=nm[None, :] & km[:, None], other=0.0)
            gate += _dot(a, wg, DOT)
            up += _dot(a, wu, DOT)
        act = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(h + r[:, None] * INTER + n[None, :], act.to(h.dtype.element_ty), mask=rm[:, None] & nm[None, :])

    @triton.jit(do_not_specialize=["TK"])
    def _down_kernel(h, w2, rows, tile_expert, weights, y, TK, H: tl.constexpr, INTER: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        tile = tl.program_id(0)
        nb = tl.program_id(1)
        e = tl.load(tile_expert + tile)
        if e < 0:
            return
        r = tl.load(rows + tile * BLOCK_M + tl.arange(0, BLOCK_M))
        rm = r < TK
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < H
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        w_e = w2 + e.to(tl.int64) * (H * INTER)
        for k0 in range(0, INTER, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < INTER
            a = tl.load(h + r[:, None] * INTER + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            w = tl.load(w_e + n[None, :] * INTER + kk[:, None], mask=nm[None, :] & km[:, None], other=0.0)
            acc += _dot(a, w, DOT)
        wt = tl.load(weights + r, mask=rm, other=0.0).to(tl.float32)
        tl.store(y + r[:, None] * H + n[None, :], acc * wt[:, None], mask=rm[:, None] & nm[None, :])


def moe_launches(num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                 target: str = "cuda") -> tuple[Launch, Launch]:
    """The gate/up and the down grouped GEMMs for `num_tokens` tokens (tiles sized for the worst case: every
    expert's run padded to BLOCK_M rows)."""
    block_m, block_n, block_k = tiles(target)["moe"]
    tk = num_tokens * top_k
    num_tiles = triton.cdiv(tk + num_experts * (block_m - 1), block_m)
    dot = dot_mode(dtype, target)
    shape = dict(H=hidden, INTER=inter, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT=dot)
    common = dict(rows=ptr(torch.int64), tile_expert=ptr(torch.int64), TK="i32")
    gate_up = Launch(_gate_up_kernel, (num_tiles, triton.cdiv(inter, block_n)), dict(shape, K=top_k),
                     dict(common, x=ptr(dtype), w13=ptr(dtype), h=ptr(dtype)))
    down = Launch(_down_kernel, (num_tiles, triton.cdiv(hidden, block_n)), shape,
                  dict(common, h=ptr(dtype), w2=ptr(dtype), weights=ptr(torch.float32), y=ptr(torch.float32)))
    return gate_up, down


def fused_moe_triton(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    T, K = topk_ids.shape
    E, two_i, H = w13.shape
    inter = two_i // 2
    gate_up, down = moe_launches(T, K, E, H, inter, x.dtype, target_of(x.device))
    rows, tile_expert = align_by_expert(topk_ids, E, gate_up.constexprs["BLOCK_M"])
    tk = T * K
    x = x.contiguous()
    h = torch.empty(tk, inter, dtype=x.dtype, device=x.device)
    y = torch.zeros(tk, H, dtype=torch.float32, device=x.device)  # rows of other ranks' experts stay 0
    gate_up(x, w13, rows, tile_expert, h, tk)
    down(h, w2, rows, tile_expert, topk_weights.float().contiguous(), y, tk)
    return y.view(T, K, H).sum(1).to(x.dtype)
