"""Continuous batching with chunked prefill and preemption by recompute.

Each step takes running sequences first (decodes and unfinished prefills, oldest first), then admits waiting
ones, all within max_num_seqs sequences and max_num_batched_tokens new tokens. While sequences of another request
wait, one request holds at most half the running slots (its `n` completions take turns; past its share, its newest
sequence is preempted to make room), so a wide request never shuts the others out. When blocks run out the newest
running sequence is preempted: its blocks are freed and it is recomputed later (never a crash, never a token lost).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]  # tokens each sequence computes this step


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._retired: list[int] = []  # preempted or finished since the last step: the runner drops their state

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def has_retired(self) -> bool:
        return bool(self._retired)

    def take_retired(self) -> list[int]:
        """Sequences preempted or finished since the last call."""
        out, self._retired = self._retired, []
        return out

    def schedule(self, only: set[Sequence] | None = None) -> ScheduledBatch:
        """The next step's sequences and their new-token counts; with `only`, those sequences alone (the engine
        runs a failed step's requests one at a time)."""
        batch = ScheduledBatch([], [])
        budget = self.max_tokens
        if only is None:
            self._make_room()
        for seq in list(self.running):
            if seq not in self.running or (only is not None and seq not in only):  # preempted meanwhile
                continue
            n = min(len(seq) - seq.num_computed, budget)
            if n <= 0:
                continue
            while not self.blocks.can_allocate(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.allocate(seq, seq.num_computed + n)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            budget -= n
        queue = list(self.waiting) if only is None else [s for s in self.waiting if s in only]
        held = Counter(s.request for s in self.running)
        several = len({s.request for s in self.waiting}) > 1
        for seq in queue:
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if several and held[seq.request] >= self.share:
                continue  # its request has its share; another request's sequence goes first
            self.blocks.admit(seq)
            n = min(len(seq) - seq.num_computed, budget)
            if not self.blocks.can_allocate(seq, seq.num_computed + n):
                self.blocks.release(seq)
                break
            self.waiting.remove(seq)
            held[seq.request] += 1
            self.blocks.hits += seq.num_cached  # counted once, when the admission holds
            self.blocks.allocate(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            budget -= n
        return batch

    @property
    def share(self) -> int:
        """The running slots one request may hold while another request waits."""
        return max(1, self.max_num_seqs // 2)

    def _make_room(self) -> None:
        """With every slot taken, each waiting request that holds less than its share gets one slot from a request
        over its share (that request's newest sequence is preempted, recomputed later): a request that came when
        the server was idle and took every slot (n = max_num_seqs) does not keep the next one waiting for it."""
        if len(self.running) < self.max_num_seqs or not self.waiting:
            return
        held = Counter(s.request for s in self.running)
        for request in dict.fromkeys(s.request for s in self.waiting if held[s.request] < self.share):
            over = [s for s in self.running if held[s.request] > self.share]
            if not over:
                return
            held[over[-1].request] -= 1
            held[request] += 1
            self._preempt(over[-1])

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0
        self._retired.append(seq.seq_id)
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (finished or aborted) wherever it is, returning its blocks."""
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        self._retired.append(seq.seq_id)
