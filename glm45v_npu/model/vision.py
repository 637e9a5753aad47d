"""Vision tower: patch embed, 2D rotary, per-image bidirectional attention, 2x2 downsample, merger."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ops
from .hf_config import VisionConfig
from .layers import Embedding, Linear, RMSNorm, SwiGLU
from .rope import vision_rope


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, self.head_dim).unbind(1)
        rope = ops.impl("apply_rope", x.device)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        outs = [
            F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1)).transpose(0, 1)
            for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths))
        ]
        return self.proj(torch.cat(outs).reshape(N, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(SwiGLU):
    """proj -> LayerNorm -> GELU -> SwiGLU."""

    def __init__(self, dim: int, context_dim: int):
        super().__init__(dim, context_dim)
        self.proj = Linear(dim, dim)
        self.post_projection_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.gelu(self.post_projection_norm(self.proj(x))))


class PatchEmbed(nn.Module):
    """Conv3d with stride = kernel, held as the equivalent linear over the flattened 3x2x14x14 patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, bias=True, flat=True)  # the Conv3d kernel, flattened

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches.to(self.proj.weight.dtype))


class PositionTable(nn.Module):
    """The learned side x side position table, resampled bicubically to each image's patch grid."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        side = cfg.image_size // cfg.patch_size
        self.position_embedding = Embedding(side * side, cfg.hidden_size)

    def forward(self, frames: list[tuple[int, int]], lengths: list[int], h_ids: torch.Tensor,
                w_ids: torch.Tensor) -> torch.Tensor:
        table = self.position_embedding.weight
        side = int(table.shape[0] ** 0.5)
        grid_2d = table.view(side, side, -1).permute(2, 0, 1)[None].float()
        sizes = torch.tensor(frames, dtype=torch.float32, device=table.device).repeat_interleave(
            torch.tensor(lengths, device=table.device), dim=0
        )
        norm_w = (w_ids.float() + 0.5) / sizes[:, 1] * 2 - 1
        norm_h = (h_ids.float() + 0.5) / sizes[:, 0] * 2 - 1
        grid = torch.stack([norm_w, norm_h], dim=-1)[None, :, None, :]
        out = F.grid_sample(grid_2d, grid, mode="bicubic", align_corners=False, padding_mode="border")
        return out[0, :, :, 0].T.to(table.dtype)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.post_conv_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embeddings = PositionTable(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        m = cfg.spatial_merge_size
        self.downsample = Linear(cfg.hidden_size * m * m, cfg.out_hidden_size, bias=True, flat=True)  # the Conv2d
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.intermediate_size)

    def forward(self, pixel_patches: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixel_patches [N, 3*2*14*14] in merge-window order -> [N / merge^2, out_hidden] image embeddings."""
        cfg, m = self.cfg, self.cfg.spatial_merge_size
        frames = [(h, w) for t, h, w in grid_thw for _ in range(t)]
        lengths = [h * w for h, w in frames]
        x = self.post_conv_layernorm(self.patch_embed(pixel_patches))
        cos, sin, h_ids, w_ids = vision_rope(frames, m, cfg.head_dim, cfg.rope_theta, x.device)
        x = x + self.embeddings(frames, lengths, h_ids, w_ids).to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        x = self.post_layernorm(x)
        x = x.view(-1, m, m, x.shape[-1]).permute(0, 3, 1, 2).reshape(-1, x.shape[-1] * m * m)
        return self.merger(self.downsample(x))
