"""Per-request state. The engine sees token ids, opaque image inputs and their content hashes, nothing GLM."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import torch

from ..inputs.processor import ImageSpan
from ..sampling_params import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)  # identity: the scheduler looks sequences up in its queues
class Sequence:
    token_ids: list[int]  # the prompt, then each generated token as it is sampled
    prompt_len: int
    params: SamplingParams
    positions: torch.Tensor  # [3, prompt_len] M-RoPE positions of the prompt
    delta: int  # generated token at index i has position i + delta on all rows
    images: list[ImageSpan] = field(default_factory=list)
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    logprobs: list[float] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached: int = 0  # of those, how many came from the prefix cache at the last admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of full blocks, in order
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    grammar: Any = None  # its structured-output matcher (engine/grammar.py), when the request has a grammar
    request: str = ""  # its request's id: the n sequences of one request share the scheduler's per-request cap
    prompt_logprobs: list | None = None  # SamplingParams.prompt_logprobs: per prompt token (the first: None)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    def __len__(self) -> int:
        return len(self.token_ids)

    def block_hash(self, index: int, block_size: int, previous: bytes) -> bytes:
        """Chained hash of block `index`: previous hash, its token ids, and the hashes of images inside it, so
        equal text with different images never shares a block."""
        lo, hi = index * block_size, (index + 1) * block_size
        h = hashlib.sha256(previous)
        ids = self.token_ids[lo:hi]
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        for span in self.images:
            if span.start < hi and span.end > lo:
                h.update(span.digest)
        return h.digest()
