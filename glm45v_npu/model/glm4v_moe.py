"""GLM-4.5V: vision tower + text decoder + lm_head, on flat token batches. Also serves text-only glm4_moe."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels.quant import dequantize_weight
from ..parallel.layout import SINGLE, Layout, all_gather_last, all_reduce
from .context import ForwardContext
from .decoder import TextModel
from .hf_config import ModelConfig, check_layout
from .layers import Linear, QuantLinear, make_linear
from .loader import checkpoint_prefix
from .moe import Experts
from .quantization import QuantPlan, Schemes
from .vision import VisionTower


class Glm4vMoe(nn.Module):
    """On several ranks: this rank's slice of the text model and lm_head; the vision tower is replicated."""

    def __init__(self, cfg: ModelConfig, layout: Layout = SINGLE, plan: QuantPlan | None = None):
        super().__init__()
        check_layout(cfg, layout)
        self.cfg, self.layout, self.plan = cfg, layout, plan or QuantPlan()
        schemes = Schemes(self.plan, lambda ours: checkpoint_prefix(cfg, ours))
        self.visual = VisionTower(cfg.vision) if cfg.vision is not None else None
        if self.visual is not None:
            _float_vision(self.visual, schemes)
        self.language_model = TextModel(cfg.text, layout, cfg.source, schemes)
        start, rows = layout.vocab(cfg.text.vocab_size)
        real = max(0, min(rows, cfg.text.vocab_size - start))  # the last rank's padding rows stay zero
        self.lm_head = make_linear(cfg.text.hidden_size, rows, schemes("lm_head", decoder=False),
                                   parts=[("lm_head", real, start if layout.world > 1 else None)])
        if cfg.text.tie_word_embeddings:  # one tensor (the embedding) fills both; same vocab split per rank
            self.lm_head.weight = self.language_model.embed_tokens.weight
            self.lm_head.parts = []

    def encode_images(self, pixel_patches: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """One [tokens_i, hidden] embedding per image, in order."""
        if self.visual is None:
            raise ValueError(f"{self.cfg.source}: this is a text-only checkpoint; it cannot take images")
        out = self.visual(pixel_patches, grid_thw)
        m2 = self.cfg.vision.spatial_merge_size ** 2
        return list(out.split([t * h * w // m2 for t, h, w in grid_thw]))

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (the runner then writes image rows over the placeholders)."""
        return all_reduce(self.language_model.embed_tokens(token_ids))

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.language_model(embeds, positions, ctx)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return all_gather_last(self.lm_head(hidden))[:, : self.cfg.text.vocab_size].float()

    def attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.language_model.layers]

    def load_weights(self, path: str | Path, progress=None) -> None:
        from .loader import load_checkpoint

        load_checkpoint(self, path, progress=progress)


def _float_vision(visual: nn.Module, schemes: Schemes) -> None:
    """The vision tower runs in float: a checkpoint that quantizes it is refused, naming the layer."""
    for name, module in visual.named_modules():
        if isinstance(module, Linear) and schemes(f"visual.{name}", decoder=False) is not None:
            raise ConfigError(f"{schemes.plan.source}: the vision tower's {name} is quantized in this checkpoint; "
                              "only the decoder's layers may be (add the vision tower to the ignore list)")


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                layout: Layout = SINGLE, plan: QuantPlan | None = None) -> Glm4vMoe:
    """Allocate (uninitialised) parameters straight on the device in the target dtype (8-bit where the plan
    says; routers stay fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Glm4vMoe(cfg, layout, plan)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def load_model(path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
               progress=None, layout: Layout = SINGLE, plan: QuantPlan | None = None) -> Glm4vMoe:
    """progress: a bar factory (see loader.load_checkpoint), or None for none. FP8 weights that the plan holds
    as floats are dequantized once they are read."""
    model = build_model(cfg, dtype, device, layout, plan)
    model.load_weights(path, progress=progress)
    if model.plan.dequantize:
        dequantize(model, dtype)
    return model


@torch.no_grad()
def dequantize(model: nn.Module, dtype: torch.dtype) -> None:
    """8-bit layers -> float layers of `dtype`, one at a time (FP8 on a device without FP8 arithmetic). Works on
    the meta device too (the memory plan counts what is left)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                plain = Linear(child.in_features, child.out_features, bias=child.bias is not None, parts=child.parts,
                               col_start=child.col_start)
                plain.weight = nn.Parameter(dequantize_weight(child.weight, child.weight_scale, child.spec.group,
                                                              dtype), requires_grad=False)
                if child.bias is not None:
                    plain.bias = child.bias
                setattr(parent, name, plain)
        if isinstance(parent, Experts) and parent.quant is not None:
            for w in ("w13", "w2"):
                q, s = getattr(parent, w), getattr(parent, f"{w}_scale")
                full = torch.stack([dequantize_weight(q[e], s[e], parent.quant.spec.group, dtype)
                                    for e in range(q.shape[0])]) if q.shape[0] else q.to(dtype)
                setattr(parent, w, nn.Parameter(full, requires_grad=False))
                setattr(parent, f"{w}_scale", None)
            parent.quant = None
