"""Decode steps on static buffers, captured as device graphs per batch bucket and replayed (device-neutral:
torch.cuda.CUDAGraph on CUDA, torch.npu.NPUGraph on Ascend, through platform.graph_api).

A decode batch of B sequences runs in the smallest bucket >= B. Its first B rows hold the step; the padding rows
store no KV (slot -1), attend to nothing (context 0) and route to no expert (their expert ids are masked to the
"not on this rank" id that every MoE kernel skips), so they change nothing. Everything from the embedding to the
logits reads the static buffers, so one captured graph serves every step of its bucket. Where capture is off
(CPU, --enforce-eager, or a failed start-up check) the same code runs eagerly on the same buffers.
"""

from __future__ import annotations

import logging

import torch

from .. import platform
from ..kernels.metadata import AttentionMetadata
from ..model.context import ForwardContext, block_table_tensor, slot_mapping

log = logging.getLogger("glm45v_npu")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


def buckets_for(max_num_seqs: int) -> tuple[int, ...]:
    """The graph buckets up to max_num_seqs (which is one itself when below 64); larger batches run eagerly."""
    if max_num_seqs >= BUCKETS[-1]:
        return BUCKETS
    return tuple(b for b in BUCKETS if b < max_num_seqs) + (max_num_seqs,)


class DecodeGraphs:
    def __init__(self, model, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device, capture: bool):
        self.model, self.block_size, self.device = model, block_size, device
        self.buckets = buckets_for(max_num_seqs)
        n, width = self.buckets[-1], max_blocks_per_seq
        i32 = dict(dtype=torch.int32, device=device)
        self.token_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(n, **i32)
        self.block_tables = torch.zeros(n, width, **i32)
        self.cu_seqlens_q = torch.arange(n + 1, **i32)
        self.valid = torch.zeros(n, dtype=torch.bool, device=device)
        # host mirrors of what load() writes, pinned on accelerators so that its copies are truly asynchronous;
        # reused every step, which is safe because a step ends with a device sync before the next load
        pinned = device.type in ("cuda", "npu")
        self.staging = {name: torch.zeros(t.shape, dtype=t.dtype, pin_memory=pinned)
                        for name, t in self.buffers().items() if name != "cu_seqlens_q"}
        self.logits: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, object] = {}
        self.capture_enabled = capture

    def buffers(self) -> dict[str, torch.Tensor]:
        """The static inputs every captured graph reads."""
        return {"token_ids": self.token_ids, "positions": self.positions, "slot_mapping": self.slot_mapping,
                "context_lens": self.context_lens, "block_tables": self.block_tables,
                "cu_seqlens_q": self.cu_seqlens_q, "valid": self.valid}

    def fits(self, batch: int) -> bool:
        return batch <= self.buckets[-1]

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def context(self, bucket: int) -> ForwardContext:
        """The step context over the static buffers' first `bucket` rows (shapes fixed per bucket)."""
        width = self.block_tables.shape[1]
        attn = AttentionMetadata(self.cu_seqlens_q[: bucket + 1], self.context_lens[:bucket],
                                 self.block_tables[:bucket], num_tokens=bucket, max_query_len=1,
                                 max_context_len=width * self.block_size, is_decode=True)
        return ForwardContext(attn, self.slot_mapping[:bucket], self.valid[:bucket])

    def load(self, token_ids: list[int], positions: torch.Tensor, context_lens: list[int],
             block_tables: list[list[int]]) -> int:
        """Write one decode step into the static buffers through their host mirrors (padding rows reset; only the
        block-table columns this step uses, since no row reads past its context); returns its bucket."""
        B = len(token_ids)
        bucket = self.bucket(B)
        used = max(len(t) for t in block_tables)
        h = self.staging
        tables = block_table_tensor(block_tables, used, bucket)
        h["block_tables"][:bucket, :used] = tables
        h["context_lens"][:bucket] = 0
        h["context_lens"][:B] = torch.tensor(context_lens, dtype=torch.int32)
        h["slot_mapping"][:bucket] = -1
        h["slot_mapping"][:B] = slot_mapping(tables, torch.arange(B), h["context_lens"][:B].long() - 1,
                                             self.block_size)
        h["token_ids"][:bucket] = 0
        h["token_ids"][:B] = torch.tensor(token_ids, dtype=torch.long)
        h["positions"][:, :bucket] = 0
        h["positions"][:, :B] = positions
        h["valid"][:bucket] = torch.arange(bucket) < B
        for name in ("token_ids", "slot_mapping", "context_lens", "valid"):
            getattr(self, name)[:bucket].copy_(h[name][:bucket], non_blocking=True)
        self.block_tables[:bucket, :used].copy_(h["block_tables"][:bucket, :used], non_blocking=True)
        self.positions[:, :bucket].copy_(h["positions"][:, :bucket], non_blocking=True)
        return bucket

    def forward(self, bucket: int) -> torch.Tensor:
        """Embedding to logits on the static buffers: what a graph captures."""
        m = self.model
        hidden = m(m.embed(self.token_ids[:bucket]), self.positions[:, :bucket], self.context(bucket))
        return m.logits(hidden)

    @torch.inference_mode()
    def run(self, bucket: int) -> torch.Tensor:
        graph = self.graphs.get(bucket)
        if graph is None:
            return self.forward(bucket)
        graph.replay()
        return self.logits[bucket]

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (Triton compiles), capture every bucket (largest first, one memory pool), then replay the
        smallest once against eager on the same inputs: on disagreement or error, one warning and eager from
        then on."""
        if not self.capture_enabled:
            return
        api = platform.graph_api(self.device)
        try:
            pool = None
            for bucket in reversed(self.buckets):
                self.forward(bucket)  # compile and settle allocations outside the graph
                platform.synchronize(self.device)
                graph = api.Graph()
                with api.capture(graph, pool=pool):
                    self.logits[bucket] = self.forward(bucket)
                pool = graph.pool()
                self.graphs[bucket] = graph
            bucket = self.buckets[0]
            eager = self.forward(bucket).clone()
            self.graphs[bucket].replay()
            platform.synchronize(self.device)
            if not torch.allclose(self.logits[bucket].float(), eager.float(), atol=1e-2, rtol=1e-2):
                raise RuntimeError("replayed logits differ from eager ones")
        except Exception as e:  # capture is an optimisation: anything wrong means eager decode
            log.warning("decode graphs disabled (%s: %s); decoding eagerly", type(e).__name__, e)
            self.graphs.clear()
            self.logits.clear()
