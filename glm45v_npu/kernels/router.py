"""MoE routing after the gate's matmul: sigmoid scores; choice by score + correction bias, limited to the
topk_group groups whose two best choices sum highest; weights = the chosen experts' unbiased scores,
renormalised (when asked) and scaled. One Triton program per token does it all (no host work, no sync).

`route_torch` is the portable twin; `route_triton` shares its signature. Ids come back in descending choice
order from both."""

from __future__ import annotations

import torch


def route_torch(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (float32 or wider) -> weights [T, top_k] float32 (or wider), ids [T, top_k] int64."""
    scores = logits.sigmoid()
    choice = scores + bias.to(scores.dtype)
    if n_group > 1:
        T, E = choice.shape
        grouped = choice.view(T, n_group, E // n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(-1)
        keep = group_scores.topk(topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(T, E)
    ids = choice.topk(top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


try:
    import triton
    import triton.language as tl

    from ._triton import Launch, ptr
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _route_kernel(logits, bias, weights_out, ids_out, scaling, E: tl.constexpr, E_PAD: tl.constexpr,
                      GROUPS: tl.constexpr, G_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr,
                      K_PAD: tl.constexpr, RENORM: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, E_PAD)
        em = e < E
        score = tl.sigmoid(tl.load(logits + t * E + e, mask=em, other=0.0).to(tl.float32))
        choice = tl.where(em, score + tl.load(bias + e, mask=em, other=0.0).to(tl.float32), float("-inf"))
        if GROUPS > 1:
            per: tl.constexpr = E // GROUPS
            grp = e // per
            g = tl.arange(0, G_PAD)
            gsel = (g[:, None] == grp[None, :]) & em[None, :]  # [groups, experts]
            vals = tl.where(gsel, choice[None, :], float("-inf"))
            best = tl.max(vals, axis=1)
            first = tl.min(tl.where(vals == best[:, None], e[None, :], E_PAD), axis=1)
            second = tl.max(tl.where(e[None, :] == first[:, None], float("-inf"), vals), axis=1)
            gscore = tl.where(g < GROUPS, best + second, float("-inf"))
            kept = tl.zeros([G_PAD], dtype=tl.int1)
            for _ in range(TOPK_GROUP):
                top = tl.max(tl.where(kept, float("-inf"), gscore), axis=0)
                pick = tl.min(tl.where((gscore == top) & ~kept, g, G_PAD), axis=0)
                kept = kept | (g == pick)
            keep_e = tl.max(tl.where(gsel & kept[:, None], 1, 0), axis=0) > 0
            choice = tl.where(keep_e, choice, float("-inf"))
        k = tl.arange(0, K_PAD)
        ids = tl.zeros([K_PAD], dtype=tl.int64)
        ws = tl.zeros([K_PAD], dtype=tl.float32)
        for j in range(K):
            top = tl.max(choice, axis=0)
            pick = tl.min(tl.where(choice == top, e, E_PAD), axis=0)
            w = tl.sum(tl.where(e == pick, score, 0.0), axis=0)
            ids = tl.where(k == j, pick.to(tl.int64), ids)
            ws = tl.where(k == j, w, ws)
            choice = tl.where(e == pick, float("-inf"), choice)
        if RENORM:
            ws = ws / (tl.sum(ws, axis=0) + 1e-20)
        km = k < K
        tl.store(weights_out + t * K + k, ws * scaling, mask=km)
        tl.store(ids_out + t * K + k, ids, mask=km)


def route_launch(T: int, num_experts: int, top_k: int, n_group: int, topk_group: int, renormalize: bool,
                 logits_dtype: torch.dtype = torch.float32) -> Launch:
    return Launch(
        _route_kernel, (T,),
        dict(E=num_experts, E_PAD=triton.next_power_of_2(num_experts), GROUPS=n_group,
             G_PAD=triton.next_power_of_2(n_group), TOPK_GROUP=topk_group, K=top_k,
             K_PAD=triton.next_power_of_2(top_k), RENORM=renormalize),
        dict(logits=ptr(logits_dtype), bias=ptr(torch.float32), weights_out=ptr(torch.float32),
             ids_out=ptr(torch.int64), scaling="fp32"))


def route_triton(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                 renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    launch = route_launch(T, E, top_k, n_group, topk_group, renormalize, logits.dtype)
    launch(logits.contiguous(), bias.float().contiguous(), weights, ids, float(scaling))
    return weights, ids
