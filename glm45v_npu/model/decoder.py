"""Decoder layers and the text model; also serves text-only glm4_moe (GLM-4.5 / 4.5-Air) checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from ..parallel.layout import SINGLE, Layout, all_reduce
from .attention import Attention
from .context import ForwardContext
from .hf_config import TextConfig
from .layers import Embedding, RMSNorm, SwiGLU
from .moe import MoE
from .quantization import FLOAT
from .rope import MRotaryEmbedding


class DecoderLayer(nn.Module):
    """Attention and MLP each return this rank's partial sum; one all-reduce each makes them whole."""

    def __init__(self, cfg: TextConfig, layer: int, layout: Layout = SINGLE, source: str = "config",
                 schemes=FLOAT):
        super().__init__()
        prefix = f"language_model.layers.{layer}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layout, source, schemes, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            self.mlp = MoE(cfg, layout, source, schemes, f"{prefix}.mlp")
        else:
            start, count = layout.even(cfg.intermediate_size, "intermediate_size", source)
            self.mlp = SwiGLU(cfg.hidden_size, count, start if layout.world > 1 else None, schemes, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (its embeddings for the first layer, residual None); -> this
        layer's MLP output and the residual stream before it. Each residual add is fused into the next norm."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = all_reduce(self.self_attn(h, cos, sin, ctx))
        h, residual = self.post_attention_layernorm(h, residual)
        return all_reduce(self.mlp(h, ctx.valid) if self.is_moe else self.mlp(h)), residual


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig, layout: Layout = SINGLE, source: str = "config", schemes=FLOAT):
        super().__init__()
        self.cfg = cfg
        start, rows = layout.vocab(cfg.vocab_size)
        self.embed_tokens = Embedding(rows, cfg.hidden_size, start, partial=layout.world > 1,
                                      real=max(0, min(rows, cfg.vocab_size - start)))
        self.rotary = MRotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.mrope_section)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, layout, source, schemes) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """embeds [T, H], positions [3, T] -> final hidden states [T, H]. cos/sin are built once per step."""
        cos, sin = self.rotary(positions)
        x, residual = embeds, None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, ctx)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]
