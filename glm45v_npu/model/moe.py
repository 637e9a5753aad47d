"""Mixture of experts: sigmoid router with correction bias and group-limited top-k, routed + shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kernels import ops
from ..kernels.quant import GROUP
from ..parallel.layout import SINGLE, Layout, all_reduce_max
from .hf_config import TextConfig
from .layers import SKIP, Piece, SwiGLU, cols, rows
from .quantization import FLOAT


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
    """Stacked expert weights: w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I]; with a quantization scheme
    they are 8-bit, with scales w13_scale [E, 2I, G] and w2_scale [E, H, G] (kernels/quant.py).

    Expert-parallel: this rank holds experts [first, first + E/N) whole; the others' (token, k) pairs are mapped
    past the local range, which the kernels skip. Tensor-parallel: every expert, I/N of its intermediate size.
    """

    def __init__(self, cfg: TextConfig, layout: Layout = SINGLE, source: str = "config", quant=None):
        super().__init__()
        E, H, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.total = E
        self.first, self.inter_start = 0, None  # this rank's first expert; its slice of each expert, if split
        if layout.expert_parallel:
            self.first, E = layout.even(E, "n_routed_experts", source)
        else:
            start, inter = layout.even(inter, "moe_intermediate_size", source)
            self.inter_start = start if layout.world > 1 else None
        self.local = E if layout.world > 1 and layout.expert_parallel else None
        self.quant = quant
        spec = quant.spec if quant is not None else None
        dtype = spec.dtype if spec is not None else None
        self.w13 = nn.Parameter(torch.empty(E, 2 * inter, H, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, H, inter, dtype=dtype), requires_grad=False)
        self.w13_scale = self.w2_scale = None
        if spec is not None:
            if spec.act == "static" or quant.msmodelslim and spec.act != "token":
                raise ConfigError(f"{source}: {quant.scheme} experts are not supported (dynamic or weight-only)")
            if spec.group and self.inter_start is not None and (self.inter_start % GROUP or inter % GROUP):
                raise ConfigError(f"{source}: tensor-parallel experts of {inter} rows cut the {GROUP}-row blocks of "
                                  "their FP8 block scales")
            self.w13_scale = nn.Parameter(torch.empty(E, 2 * inter, spec.groups(H), dtype=torch.float32),
                                          requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(E, H, spec.groups(inter), dtype=torch.float32),
                                         requires_grad=False)

    def checkpoint_plan(self, prefix: str) -> dict[str, Piece]:
        """Per-expert checkpoint tensors stacked into w13 (gate rows, then up rows) and w2, and their scales;
        other ranks' experts are skipped, and with tensor-parallel experts each rank reads its intermediate slice
        of each."""
        half, local = self.w13.shape[1] // 2, self.w13.shape[0]
        s = self.inter_start
        q = self.quant
        block = GROUP if q is not None and q.spec.group else 1
        plan = {}
        for e in range(self.total):
            i = e - self.first
            mine = 0 <= i < local
            for name, where in (("gate_proj", slice(0, half)), ("up_proj", slice(half, 2 * half)),
                                ("down_proj", slice(None))):
                down = name == "down_proj"
                src = (cols(s, half) if down else rows(s, half)) if s is not None else ()
                param = f"{prefix}.w2" if down else f"{prefix}.w13"
                base = f"{prefix}.{e}.{name}"
                if not mine:
                    plan[f"{base}.weight"] = SKIP
                    if q is not None and not q.online:
                        plan[f"{base}.weight_scale"] = SKIP
                    continue
                quantize = dict(quantize=q.spec, scale_param=f"{param}_scale") if q is not None and q.online else {}
                plan[f"{base}.weight"] = Piece(param, (i, where), src, **quantize)
                if q is None or q.online:
                    continue
                if q.weight_strategy == "tensor":
                    plan[f"{base}.weight_scale"] = Piece(f"{param}_scale", (i, where), broadcast=True)
                elif down:  # scales run along H here: this rank's column blocks of its intermediate slice
                    plan[f"{base}.weight_scale"] = Piece(f"{param}_scale", (i,), cols(s // block, half // block)
                                                         if s is not None and block > 1 else (), reshape=True,
                                                         expand=block)
                else:
                    plan[f"{base}.weight_scale"] = Piece(f"{param}_scale", (i, where), rows(s // block, -(-half // block))
                                                         if s is not None else (), reshape=True, expand=block)
                if q.msmodelslim:
                    plan[f"{base}.weight_offset"] = Piece(None, zero=True)
        return plan

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.local is not None:
            ids = ids - self.first
            ids = ids.masked_fill((ids < 0) | (ids >= self.local), self.local)
        if self.quant is None:
            return ops.impl("fused_moe", x.device)(x, self.w13, self.w2, weights, ids)
        split_rows = self.inter_start is not None and self.quant.spec.act == "token"
        return ops.impl("fused_moe", x.device)(x, self.w13, self.w2, weights, ids, self.w13_scale, self.w2_scale,
                                               self.quant.spec, all_reduce_max if split_rows else None)


class MoE(nn.Module):
    """Returns this rank's partial sum of routed and shared experts (the decoder layer all-reduces it)."""

    def __init__(self, cfg: TextConfig, layout: Layout = SINGLE, source: str = "config", schemes=FLOAT,
                 prefix: str = ""):
        super().__init__()
        self.gate = Router(cfg)
        self.num_experts = cfg.n_routed_experts
        e = f"{prefix}.experts"
        self.experts = Experts(cfg, layout, source, schemes(*(f"{e}.{i}.{p}_proj" for i in range(cfg.n_routed_experts)
                                                             for p in ("gate", "up", "down"))))
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        start, count = layout.even(shared, "shared expert intermediate size", source)
        self.shared_experts = SwiGLU(cfg.hidden_size, count, start if layout.world > 1 else None, schemes,
                                     f"{prefix}.shared_experts") if shared else None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """valid [T] bool marks real rows of a padded batch; the others route to no expert."""
        weights, ids = self.gate(x)
        if valid is not None:
            ids = torch.where(valid[:, None], ids, self.num_experts)  # the id every MoE kernel skips
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
