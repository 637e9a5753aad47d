"""Routed experts: tokens sorted by expert, one grouped matmul per expert, SwiGLU, weighted combine.

`fused_moe_torch` is the portable twin; it touches only the experts that received tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .quant import GROUP, QuantSpec, clamp_scale, expand, quantize_torch, token_scales


def fused_moe_torch(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None, spec: QuantSpec | None = None,
    row_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]; topk_* [T, K] -> [T, H].
    Pairs whose expert id is E or more belong to another rank and are skipped. With `spec`, the weights are 8-bit
    with scales [E, rows, G] (kernels/quant.py): each token's input is quantized once for every expert it goes to,
    each expert's SwiGLU output once more for its down projection (unless the scheme is weight-only). row_max:
    with tensor-parallel experts each rank holds a slice of every SwiGLU row, and this reduction (max over the
    ranks) makes its per-row scale the whole row's."""
    T, K = topk_ids.shape
    E = w13.shape[0]
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    token_of = order // K
    counts = torch.bincount(flat.clamp(max=E), minlength=E).tolist()[:E]
    wide = torch.promote_types(x.dtype, torch.float32)
    xs = _dequantized_input(x, spec)[token_of]
    h = torch.zeros(T * K, w2.shape[2], dtype=x.dtype, device=x.device)
    for e, start, n in _runs(counts):
        gate, up = F.linear(xs[start : start + n], _weight(w13, w13_scale, e, spec, xs.dtype)).chunk(2, dim=-1)
        h[start : start + n] = F.silu(gate) * up
    h = _dequantized_input(h, spec, row_max).to(xs.dtype)
    out = torch.zeros(T * K, w2.shape[1], dtype=wide, device=x.device)
    for e, start, n in _runs(counts):
        out[start : start + n] = F.linear(h[start : start + n], _weight(w2, w2_scale, e, spec, xs.dtype)).to(wide)
    out *= topk_weights.flatten()[order, None].to(wide)
    return torch.zeros(T, w2.shape[1], dtype=wide, device=x.device).index_add_(0, token_of, out).to(x.dtype)


def _runs(counts: list[int]):
    """(expert, first row, rows) of each expert with rows, in the sorted order."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, n
        start += n


def _dequantized_input(x: torch.Tensor, spec: QuantSpec | None,
                       row_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """What an expert's matmul sees of x: x itself, or (W8A8) x quantized and dequantized, in x's precision."""
    if spec is None or spec.act == "none":
        return x
    xq, scale = quantize_torch(x, spec, token_scale=synced_scales(x, spec, row_max))
    w = torch.promote_types(x.dtype, torch.float32)
    return xq.to(w) * expand(scale.to(w), x.shape[1], GROUP if spec.act == "group" else x.shape[1])


def synced_scales(x: torch.Tensor, spec: QuantSpec, row_max) -> torch.Tensor | None:
    """Per-row scales agreed over the ranks, where rows are split over them and scaled per token."""
    if row_max is None or spec.act != "token":
        return None
    return clamp_scale(row_max(token_scales(x, spec)))


def _weight(w: torch.Tensor, scale: torch.Tensor | None, e: int, spec: QuantSpec | None, dtype: torch.dtype):
    if spec is None:
        return w[e].to(dtype)
    return w[e].to(dtype) * expand(scale[e].to(dtype), w.shape[2], spec.group)


# --- Triton ---------------------------------------------------------------------------------------------------
# (token, k) pairs are sorted by expert on the device and each expert's run padded to BLOCK_M rows, without a
# host sync (the grid is sized for the worst case and empty tiles exit). Kernel 1: one tile of rows of one expert
# times its gate and up columns, SwiGLU. Kernel 2: times down, scaled by the routing weight. Then a sum over k.

try:
    import triton
    import triton.language as tl

    from ._triton import Launch, dot_mode, ptr, row_offset, target_of
    from ._triton import mma as _dot
    from .quant import TRITON_TYPES, fp8_as_bytes, quantize_triton, weight_only_unless_fp8_dot, weight_values
    from .tiles import fixed, moe_tile
except ImportError:
    triton = None


def align_by_expert_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> rows [TK + E*(block_m-1)] (index into the flat (token, k) pairs, TK = padding) and the expert of each
    block_m-row tile (-1 = unused tile). Shapes depend only on TK and E, and nothing waits for the device
    (no boolean indexing, no .item()). The twin of the alignment kernel (about 25 launches where it takes one)."""
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

    @triton.jit
    def _tile_product(a, b, acc, part, sa, sb, QUANT: tl.constexpr, G: tl.constexpr, DOT: tl.constexpr,
                      W_BYTES: tl.constexpr):
        """One K step of an expert tile: a plain dot (QUANT 0), an 8-bit dot scaled per 128-column group as it is
        added or summed raw for one scaling at the end (QUANT 1), or a dot with the weight tile dequantized first
        (QUANT 2). sa / sb: the step's row and column scales (used where they apply)."""
        if QUANT == 1:
            if G > 1:
                acc += tl.dot(a, b).to(tl.float32) * sa[:, None] * sb[None, :]
            else:
                part += tl.dot(a, b)
        elif QUANT == 2:
            acc += _dot(a, (weight_values(b, W_BYTES) * sb[None, :]).to(a.dtype), DOT)
        else:
            acc += _dot(a, b, DOT)
        return acc, part

    @triton.jit
    def _scales(scale, at, k0, mask, G: tl.constexpr, GROUP_K: tl.constexpr):
        return tl.load(scale + at * G + (k0 // GROUP_K if G > 1 else 0), mask=mask, other=0.0)

    @triton.jit(do_not_specialize=["TK"])
    def _align_kernel(ids, rows, tile_expert, TK, E: tl.constexpr, E_PAD: tl.constexpr, BM: tl.constexpr,
                      BLOCK: tl.constexpr):
        """align_by_expert_torch in one program: count each expert's pairs, pad the counts to BM rows, then place
        each pair after its expert's earlier ones (stable) and name each tile's expert. Ids >= E (another
        rank's) are never placed."""
        e = tl.arange(0, E_PAD)
        lane = tl.arange(0, BLOCK)
        counts = tl.zeros([E_PAD], tl.int32)
        for start in range(0, TK, BLOCK):
            v = tl.load(ids + start + lane, mask=start + lane < TK, other=E)
            counts += tl.sum((v[:, None] == e[None, :]).to(tl.int32), axis=0)
        padded = (counts + BM - 1) // BM * BM
        ends = tl.cumsum(padded, axis=0)
        capacity = TK + E * (BM - 1)
        for start in range(0, capacity, BLOCK):
            tl.store(rows + start + lane, TK.to(tl.int64), mask=start + lane < capacity)
        for start in range(0, tl.cdiv(capacity, BM), BLOCK):
            t = start + lane
            before = tl.sum(((ends[None, :] <= (t * BM)[:, None]) & (e[None, :] < E)).to(tl.int32), axis=1)
            tl.store(tile_expert + t, tl.where(before < E, before, -1).to(tl.int64), mask=t * BM < capacity)
        tl.debug_barrier()  # the padding rows are written before any pair's row
        placed = ends - padded  # each expert's next free row
        for start in range(0, TK, BLOCK):
            i = start + lane
            v = tl.load(ids + i, mask=i < TK, other=E)
            onehot = v[:, None] == e[None, :]
            earlier = tl.sum(((v[:, None] == v[None, :]) & (lane[None, :] < lane[:, None])).to(tl.int32), axis=1)
            dest = tl.sum(tl.where(onehot, placed[None, :], 0), axis=1) + earlier
            tl.store(rows + dest, i.to(tl.int64), mask=(i < TK) & (v < E))
            placed += tl.sum(onehot.to(tl.int32), axis=0)

    @triton.jit
    def _weight_offsets(n, kb, K_ALL: tl.constexpr, N_MAJOR: tl.constexpr):
        """32-bit offsets of a weight tile inside one expert's [N, K_ALL] matrix: [BLOCK_K, BLOCK_N] read down
        the columns (CUDA: no transpose in registers), or [BLOCK_N, BLOCK_K] along the rows (N_MAJOR, Ascend:
        contiguous rows for its vector loads, transposed after)."""
        if N_MAJOR:
            return n[:, None] * K_ALL + kb[None, :]
        return kb[:, None] + n[None, :] * K_ALL

    @triton.jit
    def _weight_tile(w, off, k0, nm, kb, K_ALL: tl.constexpr, BLOCK_K: tl.constexpr, N_MAJOR: tl.constexpr):
        """A [BLOCK_K, BLOCK_N] tile of W^T at K step k0: `w` the expert's (64-bit) base, `off` its 32-bit
        offsets (_weight_offsets), so only 32-bit offsets stay live across the K loop and each step's 64-bit
        addresses are made as it loads."""
        if N_MAJOR:
            if K_ALL % BLOCK_K == 0:
                return tl.trans(tl.load(w + k0 + off, mask=nm[:, None], other=0.0))
            return tl.trans(tl.load(w + k0 + off, mask=nm[:, None] & (kb[None, :] < K_ALL - k0), other=0.0))
        if K_ALL % BLOCK_K == 0:
            return tl.load(w + k0 + off, mask=nm[None, :], other=0.0)
        return tl.load(w + k0 + off, mask=nm[None, :] & (kb[:, None] < K_ALL - k0), other=0.0)

    @triton.jit
    def _row_tile(rows_base, k0, rm, kb, K_ALL: tl.constexpr, BLOCK_K: tl.constexpr):
        """A [BLOCK_M, BLOCK_K] tile of gathered rows (rows_base: each row's 64-bit start) at K step k0."""
        if K_ALL % BLOCK_K == 0:
            return tl.load(rows_base[:, None] + k0 + kb[None, :], mask=rm[:, None], other=0.0)
        return tl.load(rows_base[:, None] + k0 + kb[None, :], mask=rm[:, None] & (kb[None, :] < K_ALL - k0),
                       other=0.0)

    @triton.jit(do_not_specialize=["TK"])
    def _gate_up_kernel(x, w13, rows, tile_expert, h, xs, ws, TK, H: tl.constexpr, INTER: tl.constexpr,
                        K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT: tl.constexpr, QUANT: tl.constexpr, G: tl.constexpr, GROUP_K: tl.constexpr,
                        INT8: tl.constexpr, W_BYTES: tl.constexpr, N_MAJOR: tl.constexpr):
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
        kb = tl.arange(0, BLOCK_K)
        gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        gate_raw = tl.zeros([BLOCK_M, BLOCK_N], tl.int32 if INT8 else tl.float32)
        up_raw = tl.zeros([BLOCK_M, BLOCK_N], tl.int32 if INT8 else tl.float32)
        x_rows = x + row_offset(tok, H)
        w_gate = w13 + e.to(tl.int64) * (2 * INTER * H)
        w_up = w_gate + INTER * H
        off = _weight_offsets(n, kb, H, N_MAJOR)
        s_e = e.to(tl.int64) * (2 * INTER)  # the expert's first scale row
        for k0 in range(0, H, BLOCK_K):
            a = _row_tile(x_rows, k0, rm, kb, H, BLOCK_K)
            wg = _weight_tile(w_gate, off, k0, nm, kb, H, BLOCK_K, N_MAJOR)
            wu = _weight_tile(w_up, off, k0, nm, kb, H, BLOCK_K, N_MAJOR)
            sa = _scales(xs, tok, k0, rm, G, GROUP_K) if QUANT == 1 else 0.0
            sg = _scales(ws, s_e + n, k0, nm, G, GROUP_K) if QUANT != 0 else 0.0
            su = _scales(ws, s_e + INTER + n, k0, nm, G, GROUP_K) if QUANT != 0 else 0.0
            gate, gate_raw = _tile_product(a, wg, gate, gate_raw, sa, sg, QUANT, G, DOT, W_BYTES)
            up, up_raw = _tile_product(a, wu, up, up_raw, sa, su, QUANT, G, DOT, W_BYTES)
        if QUANT == 1 and G == 1:
            sa = tl.load(xs + tok, mask=rm, other=0.0)[:, None]
            gate = gate_raw.to(tl.float32) * sa * tl.load(ws + s_e + n, mask=nm, other=0.0)[None, :]
            up = up_raw.to(tl.float32) * sa * tl.load(ws + s_e + INTER + n, mask=nm, other=0.0)[None, :]
        act = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(h + row_offset(r, INTER)[:, None] + n[None, :], act.to(h.dtype.element_ty),
                 mask=rm[:, None] & nm[None, :])

    @triton.jit(do_not_specialize=["TK"])
    def _down_kernel(h, w2, rows, tile_expert, weights, y, hs, ws, TK, H: tl.constexpr, INTER: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                     QUANT: tl.constexpr, G: tl.constexpr, GROUP_K: tl.constexpr, INT8: tl.constexpr,
                     W_BYTES: tl.constexpr, N_MAJOR: tl.constexpr):
        tile = tl.program_id(0)
        nb = tl.program_id(1)
        e = tl.load(tile_expert + tile)
        if e < 0:
            return
        r = tl.load(rows + tile * BLOCK_M + tl.arange(0, BLOCK_M))
        rm = r < TK
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < H
        kb = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        raw = tl.zeros([BLOCK_M, BLOCK_N], tl.int32 if INT8 else tl.float32)
        h_rows = h + row_offset(r, INTER)
        w_e = w2 + e.to(tl.int64) * (H * INTER)
        off = _weight_offsets(n, kb, INTER, N_MAJOR)
        s_e = e.to(tl.int64) * H
        for k0 in range(0, INTER, BLOCK_K):
            a = _row_tile(h_rows, k0, rm, kb, INTER, BLOCK_K)
            w = _weight_tile(w_e, off, k0, nm, kb, INTER, BLOCK_K, N_MAJOR)
            sa = _scales(hs, r, k0, rm, G, GROUP_K) if QUANT == 1 else 0.0
            sw = _scales(ws, s_e + n, k0, nm, G, GROUP_K) if QUANT != 0 else 0.0
            acc, raw = _tile_product(a, w, acc, raw, sa, sw, QUANT, G, DOT, W_BYTES)
        if QUANT == 1 and G == 1:
            acc = (raw.to(tl.float32) * tl.load(hs + r, mask=rm, other=0.0)[:, None]
                   * tl.load(ws + s_e + n, mask=nm, other=0.0)[None, :])
        wt = tl.load(weights + r, mask=rm, other=0.0).to(tl.float32)
        tl.store(y + row_offset(r, H)[:, None] + n[None, :], acc * wt[:, None], mask=rm[:, None] & nm[None, :])


def quant_kind(spec: QuantSpec | None) -> str:
    """How the tile table names experts' quantization: none, or weight/act[/g<group>]."""
    if spec is None:
        return "none"
    return f"{spec.weight}/{spec.act}" + (f"/g{spec.group}" if spec.group else "")


def align_launch(num_experts: int, block_m: int, target: str = "cuda") -> Launch:
    """One program: the step's pairs are few (decode) or the work is small beside the expert GEMMs (prefill). Each
    step compares a block of pairs with every expert: within the table's budget of elements (Ascend's UB)."""
    e_pad = triton.next_power_of_2(num_experts)
    block = max(2, min(32, fixed(target)["align_elements"] // e_pad))
    return Launch(_align_kernel, (1,), dict(E=num_experts, E_PAD=e_pad, BM=block_m, BLOCK=block),
                  dict(ids=ptr(torch.int64), rows=ptr(torch.int64), tile_expert=ptr(torch.int64), TK="i32"))


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """align_by_expert_torch's contract, in one launch."""
    flat = topk_ids.flatten().contiguous()
    tk = flat.numel()
    capacity = tk + num_experts * (block_m - 1)
    rows = torch.empty(capacity, dtype=torch.int64, device=flat.device)
    tile_expert = torch.empty(triton.cdiv(capacity, block_m), dtype=torch.int64, device=flat.device)
    align_launch(num_experts, block_m, target_of(flat.device))(flat, rows, tile_expert, tk)
    return rows, tile_expert


def moe_launches(num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                 target: str = "cuda", spec: QuantSpec | None = None, w_bytes: bool = False) -> tuple[Launch, Launch]:
    """The gate/up and the down grouped GEMMs for `num_tokens` tokens (the grid sized for the worst case: every
    expert's run padded to BLOCK_M rows); with `spec`, on 8-bit experts (w_bytes: FP8 weights as raw bytes,
    quant.fp8_as_bytes). The tile comes from the table by the token count's bucket (tiles.moe_tile)."""
    tile = moe_tile(target, num_tokens, num_experts, hidden, inter, str(dtype).removeprefix("torch."),
                    quant_kind(spec))
    block_m, block_n, block_k = tile.block_m, tile.block_n, tile.block_k
    quant = 0 if spec is None else 2 if spec.act == "none" else 1
    tk = num_tokens * top_k
    num_tiles = triton.cdiv(tk + num_experts * (block_m - 1), block_m)
    dot = dot_mode(dtype, target)
    weight = ptr(dtype) if spec is None else "*u8" if w_bytes else "*" + TRITON_TYPES[spec.dtype]
    act = weight if quant == 1 else ptr(dtype)
    common = dict(rows=ptr(torch.int64), tile_expert=ptr(torch.int64), TK="i32")

    def shape(k: int) -> dict:
        g = spec.groups(k) if spec is not None and spec.group else 1
        return dict(H=hidden, INTER=inter, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(block_k, GROUP), DOT=dot,
                    QUANT=quant, G=g, GROUP_K=GROUP, INT8=spec is not None and spec.weight == "int8",
                    W_BYTES=w_bytes, N_MAJOR=target == "npu")

    f32 = ptr(torch.float32)
    options = tile.options(target)
    gate_up = Launch(_gate_up_kernel, (num_tiles, triton.cdiv(inter, block_n)), dict(shape(hidden), K=top_k),
                     dict(common, x=act, w13=weight, h=ptr(dtype), xs=f32, ws=f32), options)
    down = Launch(_down_kernel, (num_tiles, triton.cdiv(hidden, block_n)), shape(inter),
                  dict(common, h=act, w2=weight, weights=f32, y=f32, hs=f32, ws=f32), options)
    return gate_up, down


def fused_moe_triton(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None, spec: QuantSpec | None = None,
    row_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    T, K = topk_ids.shape
    E, two_i, H = w13.shape
    inter = two_i // 2
    spec = weight_only_unless_fp8_dot(spec, x.device) if spec is not None else None
    raw = spec is not None and fp8_as_bytes(spec, x.device)
    if raw:
        w13, w2 = w13.view(torch.uint8), w2.view(torch.uint8)
    gate_up, down = moe_launches(T, K, E, H, inter, x.dtype, target_of(x.device), spec, raw)
    rows, tile_expert = align_by_expert(topk_ids, E, gate_up.constexprs["BLOCK_M"])
    tk = T * K
    x, out_dtype = x.contiguous(), x.dtype
    h = torch.empty(tk, inter, dtype=x.dtype, device=x.device)
    y = torch.zeros(tk, H, dtype=torch.float32, device=x.device)  # rows of other ranks' experts stay 0
    xs = hs = ws13 = ws2 = y  # never read without scales
    if spec is not None:
        ws13, ws2 = w13_scale.float().contiguous(), w2_scale.float().contiguous()
        if spec.act != "none":
            x, xs = quantize_triton(x, spec)
    gate_up(x, w13, rows, tile_expert, h, xs, ws13, tk)
    if spec is not None and spec.act != "none":
        token_scale = synced_scales(h, spec, row_max)
        if token_scale is None:
            h, hs = quantize_triton(h, spec)
        else:
            h, hs = quantize_torch(h, spec, token_scale=token_scale)
            hs = hs.float().contiguous()
    down(h, w2, rows, tile_expert, topk_weights.float().contiguous(), y, hs, ws2, tk)
    return y.view(T, K, H).sum(1).to(out_dtype)
