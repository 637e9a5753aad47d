"""Turns a scheduled batch into flat step inputs, runs the model, and returns the logits of the sequences that
sample this step (then those of the prompt positions whose next token's logprob a request asked for).

`prepare` (rank 0) reads the scheduler's sequences and produces a StepPlan of plain host data without changing
anything; `execute` (every rank) runs its StepInputs; `commit` (rank 0) advances the sequences once the step has
succeeded. A step that raises between the two leaves every sequence as it was, so the next step recomputes it.
With several ranks, rank 0 broadcasts each StepInputs and the other ranks only ever execute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.context import ForwardContext
from .graph import DecodeGraphs
from .scheduler import ScheduledBatch
from .sequence import Sequence


@dataclass
class StepInputs:
    token_ids: list[int]
    positions: torch.Tensor  # [3, T] on the host
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]  # flat index of each sampling sequence's last token
    prompt_rows: list[int] = field(default_factory=list)  # rows whose next prompt token's logprob is asked
    encode: list[tuple[int, list[torch.Tensor], list[tuple[int, int, int]]]] = field(default_factory=list)
    image_rows: list[tuple[int, int, int, int]] = field(default_factory=list)  # seq, src row, dst row, count
    drop_images: list[int] = field(default_factory=list)  # sequences whose image embeddings can go


@dataclass
class StepPlan:
    inputs: StepInputs
    batch: ScheduledBatch
    samplers: list[Sequence]  # sequences whose last token is computed this step: they sample
    encoded: list[int]  # sequences whose vision output this step computes
    images_done: list[int]  # sequences whose last image token this step consumes
    prompt_spans: list[tuple[Sequence, int, int]] = field(default_factory=list)  # seq, first position, count


def allocate_kv_cache(model, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """One K and one V tensor [num_blocks, block_size, kv_heads, head_dim] per attention layer (this rank's
    heads). Zeroed: attention masks unused slots, and masked garbage could still be NaN."""
    for layer in model.attention_layers():
        shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        layer.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        layer.v_cache = torch.zeros(shape, dtype=dtype, device=device)


def drop_kv_cache(model) -> None:
    for layer in model.attention_layers():
        layer.k_cache = layer.v_cache = torch.empty(0)


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        self.model, self.block_size, self.device = model, block_size, device
        self.image_embeds: dict[int, torch.Tensor] = {}  # vision output per sequence until its prompt is in
        self.encoded: set[int] = set()  # rank 0: sequences whose vision output every rank holds
        self.pending_drops: set[int] = set()  # sequences whose image embeddings every rank drops next
        self.graphs: DecodeGraphs | None = None
        allocate_kv_cache(model, num_blocks, block_size, device, dtype)

    def enable_decode_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool) -> None:
        """Decode steps of up to the largest bucket run on static buffers, captured as graphs when `capture`
        (eagerly on the same buffers otherwise, e.g. on a CPU)."""
        self.graphs = DecodeGraphs(self.model, max_num_seqs, -(-max_model_len // self.block_size), self.block_size,
                                   self.device, capture)
        self.graphs.capture()

    def prepare(self, batch: ScheduledBatch) -> StepPlan:
        ids, pos, rows, encode, samplers, sample_rows, images_done = [], [], [], [], [], [], []
        prompt_rows, prompt_spans = [], []
        offset = 0
        for s, n in zip(batch.seqs, batch.num_new):
            lo, hi = s.num_computed, s.num_computed + n
            ids.extend(s.token_ids[lo:hi])
            p_hi = min(hi, s.prompt_len)
            if lo < p_hi:
                pos.append(s.positions[:, lo:p_hi])
            if hi > s.prompt_len:
                pos.append(torch.arange(max(lo, s.prompt_len), hi).expand(3, -1) + s.delta)
            if s.images and s.seq_id not in self.encoded and lo < s.images[-1].end:
                # the vision tower runs once per request, on its first chunk that still has image tokens
                encode.append((s.seq_id, [sp.pixels for sp in s.images], [sp.grid for sp in s.images]))
            row = 0
            for span in s.images:
                a, b = max(lo, span.start), min(hi, span.end)
                if a < b:
                    rows.append((s.seq_id, row + a - span.start, a - lo + offset, b - a))
                row += span.end - span.start
            if s.prompt_logprobs is not None and lo < s.prompt_len - 1:  # position j predicts prompt token j + 1
                count = min(hi, s.prompt_len - 1) - lo
                prompt_rows.extend(range(offset, offset + count))
                prompt_spans.append((s, lo, count))
            offset += n
            if s.images and lo < s.images[-1].end <= hi:
                images_done.append(s.seq_id)
            if hi == len(s):
                samplers.append(s)
                sample_rows.append(offset - 1)
        encoded = [e[0] for e in encode]
        drops = self.pending_drops - set(encoded)  # done in committed steps; a retried step still finds its own
        inputs = StepInputs(
            token_ids=ids, positions=torch.cat(pos, dim=1), query_lens=list(batch.num_new),
            context_lens=[s.num_computed + n for s, n in zip(batch.seqs, batch.num_new)],
            block_tables=[list(s.block_table) for s in batch.seqs], sample_rows=sample_rows,
            prompt_rows=prompt_rows, encode=encode, image_rows=rows, drop_images=sorted(drops),
        )
        return StepPlan(inputs, batch, samplers, encoded, images_done, prompt_spans)

    def commit(self, plan: StepPlan) -> None:
        """The step ran: its tokens are in the cache and its vision outputs are where the next steps expect."""
        for s, n in zip(plan.batch.seqs, plan.batch.num_new):
            s.num_computed += n
        self.encoded.update(plan.encoded)
        self.encoded.difference_update(plan.images_done)
        self.pending_drops.difference_update(plan.inputs.drop_images, plan.encoded)
        self.pending_drops.update(plan.images_done)  # dropped by the next step, once this one has held

    def forget(self, seq_id: int) -> None:
        """A preempted or finished sequence: drop any vision output it may have (also one a failed step left)
        on every rank with the next step; a preempted one is encoded again when it comes back."""
        self.encoded.discard(seq_id)
        self.pending_drops.add(seq_id)

    def drop_only(self) -> StepInputs | None:
        """With nothing to schedule, a step that only drops vision outputs on every rank."""
        if not self.pending_drops:
            return None
        return StepInputs([], torch.zeros(3, 0, dtype=torch.long), [], [], [], [],
                          drop_images=sorted(self.pending_drops))

    @torch.inference_mode()
    def execute(self, inp: StepInputs) -> torch.Tensor:
        m = self.model
        for seq_id in inp.drop_images:  # vision outputs no committed step needs any more
            self.image_embeds.pop(seq_id, None)
        for seq_id, pixels, grids in inp.encode:
            # one image at a time: the vision tower's peak memory is that of the largest image, not of the batch
            self.image_embeds[seq_id] = torch.cat(
                [e for px, g in zip(pixels, grids) for e in m.encode_images(px.to(self.device), [g])])
        B = len(inp.query_lens)
        if (self.graphs is not None and B and self.graphs.fits(B) and len(inp.token_ids) == B
                and not inp.image_rows and not inp.prompt_rows and inp.sample_rows == list(range(B))):  # decode
            bucket = self.graphs.load(inp.token_ids, inp.positions, inp.context_lens, inp.block_tables)
            return self.graphs.run(bucket)[:B]
        embeds = m.embed(torch.tensor(inp.token_ids, dtype=torch.long, device=self.device))
        for seq_id, src, dst, count in inp.image_rows:
            embeds[dst : dst + count] = self.image_embeds[seq_id][src : src + count].to(embeds.dtype)
        if not inp.token_ids:
            return embeds.new_zeros(0)
        ctx = ForwardContext.build(inp.query_lens, inp.context_lens, inp.block_tables, self.block_size, self.device)
        hidden = m(embeds, inp.positions.to(self.device), ctx)
        rows = inp.sample_rows + inp.prompt_rows  # the sampling rows first, then the prompt's
        if not rows:
            return hidden.new_zeros(0)
        return m.logits(hidden[torch.tensor(rows, device=self.device)])
