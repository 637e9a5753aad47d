"""ForwardContext: the flat description of one model step, built by the runner from host lists and read by the
model. The model never sees padding or per-request objects, only these tensors; the kernels get the part they
need (AttentionMetadata, the slot mapping) and nothing above it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..kernels.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V go in the cache; -1 = do not store
    valid: torch.Tensor | None = None  # [T] bool, for padded batches (decode graphs): False rows route nowhere

    @property
    def is_decode(self) -> bool:
        return self.attn.is_decode

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> ForwardContext:
        """From host lists: each sequence's new-token count, total length after the step and block ids. The one
        way a step context is made (the runner, the warm-up profile, the roofline and the tests use it)."""
        tables = block_table_tensor(block_tables)
        q_lens = torch.tensor(list(query_lens), dtype=torch.int32)
        ctx_lens = torch.tensor(list(context_lens), dtype=torch.int32)
        cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        torch.cumsum(q_lens, 0, out=cu[1:])
        total = int(cu[-1])
        seq = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens, output_size=total)
        pos = (torch.arange(total) - cu[seq] + ctx_lens[seq] - q_lens[seq]).long()  # absolute positions
        slots = slot_mapping(tables, seq, pos, block_size)
        attn = AttentionMetadata(
            cu_seqlens_q=cu.to(device, non_blocking=True),
            context_lens=ctx_lens.to(device, non_blocking=True),
            block_tables=tables.to(device, non_blocking=True),
            num_tokens=total,
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
            is_decode=all(q == 1 for q in query_lens),
            host_cu_seqlens_q=cu.tolist(),
            host_context_lens=list(context_lens),
        )
        return cls(attn, slots.to(device, non_blocking=True))


def block_table_tensor(block_tables: Sequence[Sequence[int]], width: int | None = None, rows: int | None = None
                       ) -> torch.Tensor:
    """Host int32 [rows, width] block tables, unused entries 0 (rows past the given tables: all 0)."""
    width = width or max(1, max(len(t) for t in block_tables))
    padding = [[0] * width] * ((rows or len(block_tables)) - len(block_tables))
    return torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables] + padding, dtype=torch.int32)


def slot_mapping(tables: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """The cache slot of each new token, from its sequence's block table and its absolute position."""
    return tables[seq, pos // block_size].long() * block_size + pos % block_size
