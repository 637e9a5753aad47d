"""Paged KV blocks: reference counts, and a prefix cache keyed by chained block hashes, evicted LRU."""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.block_of: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evicted first
        self.hits = 0  # prompt tokens served from the cache, over the run (counted by the scheduler on admission)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.hash_of[block] is not None:
            del self.block_of[self.hash_of[block]]
            self.hash_of[block] = None
        self.ref[block] = 1
        return block

    def _reuse(self, block: int) -> None:
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def admit(self, seq: Sequence) -> None:
        """Attach the longest cached prefix of full blocks (always leaving a token to compute)."""
        seq.block_hashes, seq.num_computed, seq.num_cached = [], 0, 0
        if not self.prefix_caching or seq.params.prompt_logprobs is not None:  # every prompt token is computed
            return
        bs, previous = self.block_size, b""
        for i in range((len(seq) - 1) // bs):  # a recomputed sequence can reuse its own generated blocks
            previous = seq.block_hash(i, bs, previous)
            block = self.block_of.get(previous)
            if block is None:
                break
            self._reuse(block)
            seq.block_table.append(block)
            seq.block_hashes.append(previous)
        seq.num_computed = seq.num_cached = len(seq.block_table) * bs

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take())

    def register(self, seq: Sequence) -> None:
        """Publish the hashes of blocks that became full and computed, so later requests can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        while len(seq.block_hashes) < min(seq.num_computed, len(seq)) // bs:
            i = len(seq.block_hashes)
            previous = seq.block_hashes[-1] if seq.block_hashes else b""
            h = seq.block_hash(i, bs, previous)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.block_of and self.hash_of[block] is None:
                self.block_of[h] = block
                self.hash_of[block] = h

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references; unreferenced blocks return to the pool, cached ones kept until evicted."""
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
                if self.hash_of[block] is None:
                    self.free.move_to_end(block, last=False)  # nothing cached: reuse first
        seq.block_table = []
        seq.block_hashes = []
