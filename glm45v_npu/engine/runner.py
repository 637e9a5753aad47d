"""Turns a scheduled batch into flat tensors (ForwardContext, embeddings, positions), runs the model, and
returns the logits of the sequences that sample this step."""

from __future__ import annotations

import torch

from ..context import ForwardContext
from .scheduler import ScheduledBatch
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        self.model, self.block_size, self.device = model, block_size, device
        t = model.cfg.text
        shape = (num_blocks, block_size, t.num_key_value_heads, t.head_dim)
        for attn in model.attention_layers():
            attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def kv_bytes_per_block(model, block_size: int, dtype: torch.dtype) -> int:
        t = model.cfg.text
        return 2 * t.num_hidden_layers * block_size * t.num_key_value_heads * t.head_dim * dtype.itemsize

    def _encode_images(self, seqs: list[Sequence]) -> None:
        """The vision tower runs once per request, on its first chunk that still has image tokens to compute."""
        todo = [s for s in seqs if s.images and s.image_embeds is None and s.num_computed < s.images[-1].end]
        if not todo:
            return
        pixels = torch.cat([span.pixels for s in todo for span in s.images]).to(self.device)
        grids = [span.grid for s in todo for span in s.images]
        embeds = iter(self.model.encode_images(pixels, grids))
        for s in todo:
            s.image_embeds = torch.cat([next(embeds) for _ in s.images])

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        self._encode_images(batch.seqs)
        ids, pos, image_rows, image_src = [], [], [], []
        offset = 0
        for s, n in zip(batch.seqs, batch.num_new):
            lo, hi = s.num_computed, s.num_computed + n
            ids.extend(s.token_ids[lo:hi])
            p_hi = min(hi, s.prompt_len)
            if lo < p_hi:
                pos.append(s.positions[:, lo:p_hi])
            if hi > s.prompt_len:
                pos.append(torch.arange(max(lo, s.prompt_len), hi).expand(3, -1) + s.delta)
            row = 0
            for span in s.images:
                a, b = max(lo, span.start), min(hi, span.end)
                if a < b:
                    image_rows.append(torch.arange(a, b) - lo + offset)
                    image_src.append(s.image_embeds[row + a - span.start : row + b - span.start])
                row += span.end - span.start
            offset += n
        tokens = torch.tensor(ids, device=self.device)
        embeds = self.model.embed(tokens)
        if image_rows:
            embeds[torch.cat(image_rows).to(self.device)] = torch.cat(image_src).to(embeds.dtype)
        positions = torch.cat(pos, dim=1).to(self.device)
        ctx = ForwardContext.build(
            batch.num_new, [s.num_computed + n for s, n in zip(batch.seqs, batch.num_new)],
            [s.block_table for s in batch.seqs], self.block_size, self.device,
        )
        hidden = self.model(embeds, positions, ctx)
        samplers, last = [], []
        end = 0
        for s, n in zip(batch.seqs, batch.num_new):
            end += n
            s.num_computed += n
            if s.num_computed == len(s):
                samplers.append(s)
                last.append(end - 1)
            if not s.in_prefill:
                s.image_embeds = None
        logits = self.model.logits(hidden[torch.tensor(last, device=self.device)]) if last else hidden.new_zeros(0)
        return samplers, logits
