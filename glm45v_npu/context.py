"""ForwardContext: the flat description of one model step, shared by the engine (which builds it) and the
model (which reads it). The model never sees padding or per-request objects, only these tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class ForwardContext:
    is_decode: bool  # every sequence brings exactly one new token
    query_lens: list[int]  # new tokens per sequence (host copy, for shapes)
    context_lens: list[int]  # cached + new tokens per sequence after this step (host copy)
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    context_lens_t: torch.Tensor  # [B] int32
    slot_mapping: torch.Tensor  # [T] int64; -1 = do not store
    block_tables: torch.Tensor  # [B, max_blocks] int32, unused entries 0
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens)

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> ForwardContext:
        """From host lists: each sequence's new-token count, total length after the step and block ids."""
        slots: list[int] = []
        for q, c, table in zip(query_lens, context_lens, block_tables):
            for pos in range(c - q, c):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max(1, max(len(t) for t in block_tables))
        tables = [list(t) + [0] * (width - len(t)) for t in block_tables]
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)

        def i32(x: list) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int32).to(device, non_blocking=True)

        return cls(
            is_decode=all(q == 1 for q in query_lens),
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            cu_seqlens_q=i32(cu),
            context_lens_t=i32(list(context_lens)),
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(device, non_blocking=True),
            block_tables=i32(tables),
            block_size=block_size,
        )
