"""Mixture of experts: sigmoid router with correction bias and group-limited top-k, routed + shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ..distributed import SINGLE, Layout
from ..kernels import ops
from .layers import SwiGLU


class Router(nn.Module):
    """fp32 logits -> sigmoid scores; choice uses scores + bias; weights are the unbiased scores."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        E = cfg.n_routed_experts
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=torch.float32), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(E, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        return ops.impl("route", x.device)(logits, self.e_score_correction_bias, self.top_k, self.n_group,
                                            self.topk_group, self.norm_topk_prob, self.scaling)


class Experts(nn.Module):
    """Stacked expert weights: w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I].

    Expert-parallel: this rank holds experts [first, first + E/N) whole; the others' (token, k) pairs are mapped
    past the local range, which the kernels skip. Tensor-parallel: every expert, I/N of its intermediate size.
    """

    def __init__(self, cfg: TextConfig, layout: Layout = SINGLE, source: str = "config"):
        super().__init__()
        E, H, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.first = 0
        if layout.expert_parallel:
            self.first, E = layout.even(E, "n_routed_experts", source)
        else:
            _, inter = layout.even(inter, "moe_intermediate_size", source)
        self.local = E if layout.world > 1 and layout.expert_parallel else None
        self.w13 = nn.Parameter(torch.empty(E, 2 * inter, H), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, H, inter), requires_grad=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.local is not None:
            ids = ids - self.first
            ids = ids.masked_fill((ids < 0) | (ids >= self.local), self.local)
        return ops.impl("fused_moe", x.device)(x, self.w13, self.w2, weights, ids)


class MoE(nn.Module):
    """Returns this rank's partial sum of routed and shared experts (the decoder layer all-reduces it)."""

    def __init__(self, cfg: TextConfig, layout: Layout = SINGLE, source: str = "config"):
        super().__init__()
        self.gate = Router(cfg)
        self.num_experts = cfg.n_routed_experts
        self.experts = Experts(cfg, layout, source)
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, layout.even(shared, "shared expert intermediate size", source)[1])
            if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """valid [T] bool marks real rows of a padded batch; the others route to no expert."""
        weights, ids = self.gate(x)
        if valid is not None:
            ids = ids.masked_fill(~valid[:, None], self.num_experts)  # the id every MoE kernel skips
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
