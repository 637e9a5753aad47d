"""Decoder layers and the text model; also serves text-only glm4_moe (GLM-4.5 / 4.5-Air) checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from ..context import ForwardContext
from .attention import Attention
from .layers import Embedding, RMSNorm, SwiGLU
from .moe import MoE
from .rope import MRotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = MRotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.mrope_section)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """embeds [T, H], positions [3, T] -> final hidden states [T, H]. cos/sin are built once per step."""
        cos, sin = self.rotary(positions)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        return self.norm(x)
