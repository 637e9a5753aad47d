"""M-RoPE cos/sin for the text model and 2D rotary for the vision tower (NeoX layout: half table doubled)."""

from __future__ import annotations

import torch
from torch import nn


class MRotaryEmbedding(nn.Module):
    """Maps positions [3, T] (t, h, w rows) to cos, sin [T, rotary_dim].

    Frequency i takes its angle from the row its mrope_section assigns it; with no section (text-only GLM-4.5)
    all frequencies use row 0, which equals plain RoPE because text rows are identical.
    """

    def __init__(self, rotary_dim: int, theta: float, mrope_section: tuple[int, ...] | None):
        super().__init__()
        half = rotary_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        sections = mrope_section or (half,)
        rows = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(sections)])
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("freq_row", rows, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            positions = positions.expand(3, -1)
        freqs = positions[..., None].float() * self.inv_freq  # [3, T, half]
        freqs = freqs.gather(0, self.freq_row.view(1, 1, -1).expand(1, freqs.shape[1], -1))[0]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def vision_rope(grid_hw: list[tuple[int, int]], merge: int, head_dim: int, theta: float,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2D rotary over all patches of all images, patches in merge-window order.

    Returns cos, sin [N, head_dim] and the h, w patch coordinates [N] (also used for the position table).
    """
    hs, ws = [], []
    for h, w in grid_hw:
        hh = torch.arange(h, device=device).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        ww = torch.arange(w, device=device).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        hs.append(hh.permute(0, 2, 1, 3).reshape(-1))
        ws.append(ww.permute(0, 2, 1, 3).reshape(-1))
    h_ids, w_ids = torch.cat(hs), torch.cat(ws)
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=device) / spatial))
    freqs = torch.cat([h_ids[:, None].float() * inv_freq, w_ids[:, None].float() * inv_freq], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin(), h_ids, w_ids
