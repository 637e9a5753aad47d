"""Which implementation each op takes on a device. The CPU runs the torch twins."""

from __future__ import annotations

import torch

OPS = ("split_qkv_rmsnorm_rope", "paged_attention", "store_kv", "fused_moe")


def describe(device: torch.device) -> dict[str, str]:
    return {op: "torch twin" for op in OPS}
