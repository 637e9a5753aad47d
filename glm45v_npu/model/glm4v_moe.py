"""GLM-4.5V: vision tower + text decoder + lm_head, on flat token batches. Also serves text-only glm4_moe."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..parallel.layout import SINGLE, Layout, all_gather_last, all_reduce
from .context import ForwardContext
from .decoder import TextModel
from .hf_config import ModelConfig
from .layers import Linear
from .vision import VisionTower


class Glm4vMoe(nn.Module):
    """On several ranks: this rank's slice of the text model and lm_head; the vision tower is replicated."""

    def __init__(self, cfg: ModelConfig, layout: Layout = SINGLE):
        super().__init__()
        check_layout(cfg, layout)
        self.cfg, self.layout = cfg, layout
        self.visual = VisionTower(cfg.vision) if cfg.vision is not None else None
        self.language_model = TextModel(cfg.text, layout, cfg.source)
        start, rows = layout.vocab(cfg.text.vocab_size)
        real = max(0, min(rows, cfg.text.vocab_size - start))  # the last rank's padding rows stay zero
        self.lm_head = Linear(cfg.text.hidden_size, rows,
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


def check_layout(cfg: ModelConfig, layout: Layout) -> None:
    """A clear error, before anything is built or started, when the model does not split over layout.world ranks."""
    t, src = cfg.text, cfg.source
    layout.even(t.num_attention_heads, "num_attention_heads", src)
    layout.kv_heads(t.num_key_value_heads, src)
    layout.even(t.intermediate_size, "intermediate_size", src)
    layout.even(t.moe_intermediate_size * t.n_shared_experts, "shared expert intermediate size", src)
    if layout.expert_parallel:
        layout.even(t.n_routed_experts, "n_routed_experts", src)
    else:
        layout.even(t.moe_intermediate_size, "moe_intermediate_size", src)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                layout: Layout = SINGLE) -> Glm4vMoe:
    """Allocate (uninitialised) parameters straight on the device in the target dtype; routers stay fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Glm4vMoe(cfg, layout)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def load_model(path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
               progress=None, layout: Layout = SINGLE) -> Glm4vMoe:
    """progress: a bar factory (see loader.load_checkpoint), or None for none."""
    model = build_model(cfg, dtype, device, layout)
    model.load_weights(path, progress=progress)
    return model
