"""AttentionMetadata: what the attention kernels need to know about one step, as tensors and plain ints."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class AttentionMetadata:
    cu_seqlens_q: torch.Tensor  # [B + 1] int32: where each sequence's new tokens start in the flat batch
    context_lens: torch.Tensor  # [B] int32: cached + new tokens per sequence after this step (0 = padding row)
    block_tables: torch.Tensor  # [B, max_blocks] int32, unused entries 0
    num_tokens: int  # host ints: shapes for the prefill grid and the torch twin's padded batch
    max_query_len: int
    max_context_len: int
    is_decode: bool  # every sequence brings exactly one new token
    host_cu_seqlens_q: list[int] | None = None  # host copies, for vendor ops that take lengths as lists
    host_context_lens: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @cached_property
    def padded_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the twin's attention over a padded [B, max_q] batch: each token's sequence and offset, and the
        causal mask [B, max_q, max_context] that also bounds keys by context length. Built once per step."""
        dev = self.cu_seqlens_q.device
        q_lens = self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]
        seq_of_tok = torch.repeat_interleave(torch.arange(self.num_seqs, device=dev), q_lens,
                                             output_size=self.num_tokens)
        off_of_tok = torch.arange(self.num_tokens, device=dev) - self.cu_seqlens_q[:-1].long()[seq_of_tok]
        q_pos = (self.context_lens - q_lens).long()[:, None] + torch.arange(self.max_query_len, device=dev)
        mask = torch.arange(self.max_context_len, device=dev)[None, None, :] <= q_pos[:, :, None]
        return seq_of_tok, off_of_tok, mask
