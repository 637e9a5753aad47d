"""Text attention: one fused qkv projection, split + optional per-head QK norm + M-RoPE, paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import ops
from ..parallel.layout import SINGLE, Layout
from .context import ForwardContext
from .hf_config import TextConfig
from .layers import RMSNorm, make_linear
from .quantization import FLOAT


class Attention(nn.Module):
    """This rank's heads; forward returns the o_proj partial sum (the decoder layer all-reduces it)."""

    def __init__(self, cfg: TextConfig, layout: Layout = SINGLE, source: str = "config", schemes=FLOAT,
                 prefix: str = ""):
        super().__init__()
        q0, self.num_heads = layout.even(cfg.num_attention_heads, "num_attention_heads", source)
        k0, self.num_kv_heads = layout.kv_heads(cfg.num_key_value_heads, source)
        self.head_dim = hd = cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * hd, self.num_kv_heads * hd
        self.scale = hd**-0.5
        split = layout.world > 1  # this rank's heads: rows of q, k, v, and o_proj's matching columns
        qkv = schemes(*(f"{prefix}.{p}_proj" for p in "qkv"))
        self.qkv_proj = make_linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, qkv, bias=cfg.attention_bias,
                                    parts=[("q_proj", self.q_size, q0 * hd if split else None),
                                           ("k_proj", self.kv_size, k0 * hd if split else None),
                                           ("v_proj", self.kv_size, k0 * hd if split else None)])
        self.o_proj = make_linear(self.q_size, cfg.hidden_size, schemes(f"{prefix}.o_proj"),
                                  col_start=q0 * hd if split else None)
        self.qk_norm_eps = cfg.rms_norm_eps if cfg.use_qk_norm else None
        if cfg.use_qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T, dev = x.shape[0], x.device
        norm = self.qk_norm_eps is not None
        q, k, v = ops.qkv_split(ctx.is_decode, dev)(
            self.qkv_proj(x), sin, cos, self.q_size, self.kv_size, self.head_dim,
            self.qk_norm_eps,
            self.q_norm.weight if norm else None,
            self.k_norm.weight if norm else None,
        )
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        ops.impl("store_kv", dev)(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        o = ops.impl("paged_attention", dev)(
            q.view(T, self.num_heads, self.head_dim), self.k_cache, self.v_cache, ctx.attn, self.scale)
        return self.o_proj(o.reshape(T, self.q_size))
