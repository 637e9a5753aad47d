"""What the engine keeps per request: its completions (one sequence, detokenizer and logprobs each), what delta
outputs have reported so far, and how a request becomes a RequestOutput."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams
from .answer import parse_boxes
from .detokenizer import IncrementalDetokenizer
from .sequence import Sequence, Status


@dataclass(eq=False)
class Completion:
    index: int  # its place among the request's n completions
    seq: Sequence
    detok: IncrementalDetokenizer
    text: str = ""  # the part of the decoded text that is safe to show (stop strings held back)
    logprobs: list[dict[int, Logprob]] | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0  # what delta outputs have reported so far
    sent_text: int = 0
    changed: bool = False


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[Completion]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    error: str | None = None  # why the engine ended it (a step that failed with it alone)
    strikes: int = 0  # steps that failed with only this request in them, in a row
    image_sizes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.seq.status is Status.FINISHED for c in self.completions)

    @property
    def running(self) -> bool:
        """Some completion has been admitted (it holds blocks, or was preempted after holding them)."""
        return any(c.seq.status is Status.RUNNING for c in self.completions)

    def output(self, delta: bool) -> RequestOutput:
        """The whole output so far, or (delta) what changed since the last report."""
        outputs = []
        for c in self.completions:
            if delta and not c.changed:
                continue
            seq = c.seq
            t0, x0 = (c.sent_tokens, c.sent_text) if delta else (0, 0)
            outputs.append(CompletionOutput(
                index=c.index, text=c.text[x0:], token_ids=seq.output_ids[t0:],
                cumulative_logprob=sum(seq.logprobs) if c.logprobs is not None else None,
                logprobs=c.logprobs[t0:] if c.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=c.stop_reason,
                boxes=parse_boxes(c.text, self.image_sizes) if seq.finish_reason else None))
            c.sent_tokens, c.sent_text = seq.num_output, len(c.text)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished,
                             self.metrics, self.num_cached_tokens, error=self.error, image_sizes=self.image_sizes,
                             prompt_logprobs=self.completions[0].seq.prompt_logprobs if self.completions else None)


def derived_seed(seed: int, index: int) -> int:
    """Sample i of a seeded request with n > 1: sample 0 uses the seed itself, so n=1 and n>1 agree on it."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1
