"""ForwardContext: the flat description of one model step, shared by the engine (which builds it) and the
model (which reads it). The model never sees padding or per-request objects, only these tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

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

    @cached_property
    def padded_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For attention over a padded [B, max_q] batch: each token's sequence and offset, and the causal mask
        [B, max_q, max_context] that also bounds keys by context length. Built once per step, used by every layer."""
        dev = self.cu_seqlens_q.device
        q_lens = self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]
        seq_of_tok = torch.repeat_interleave(torch.arange(self.num_seqs, device=dev), q_lens,
                                             output_size=sum(self.query_lens))
        off_of_tok = torch.arange(seq_of_tok.numel(), device=dev) - self.cu_seqlens_q[:-1].long()[seq_of_tok]
        q_pos = (self.context_lens_t - q_lens).long()[:, None] + torch.arange(self.max_query_len, device=dev)
        mask = torch.arange(self.max_context_len, device=dev)[None, None, :] <= q_pos[:, :, None]
        return seq_of_tok, off_of_tok, mask

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
        width = max(1, max(len(t) for t in block_tables))
        tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        q_lens = torch.tensor(list(query_lens), dtype=torch.int32)
        ctx_lens = torch.tensor(list(context_lens), dtype=torch.int32)
        cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        torch.cumsum(q_lens, 0, out=cu[1:])
        seq = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens, output_size=int(cu[-1]))
        pos = (torch.arange(int(cu[-1])) - cu[seq] + ctx_lens[seq] - q_lens[seq]).long()  # absolute positions
        slots = tables[seq, pos // block_size].long() * block_size + pos % block_size
        return cls(
            is_decode=all(q == 1 for q in query_lens),
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            cu_seqlens_q=cu.to(device, non_blocking=True),
            context_lens_t=ctx_lens.to(device, non_blocking=True),
            slot_mapping=slots.to(device, non_blocking=True),
            block_tables=tables.to(device, non_blocking=True),
            block_size=block_size,
        )
