"""SamplingParams (vLLM's names and meanings) and the batched sampler (per-request parameters, on the logits'
device)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .errors import FieldError

OUTPUT_KINDS = ("cumulative", "delta", "final_only")
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: until the context is full
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0  # on generated tokens, as OpenAI and vLLM define them
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # on prompt and generated tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    min_tokens: int = 0  # eos and stop tokens are masked out until this many tokens are generated
    logprobs: int | None = None  # None: no logprobs; N: the sampled token's and the top N
    skip_special_tokens: bool = True
    output_kind: str = "cumulative"  # what step() reports: the whole output so far, only what is new, or the end

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self._check_types()
        checks = [
            ("n", 1 <= self.n <= 64, "must be in 1..64"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0 <= self.temperature <= 100, "must be in [0, 100]"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be >= -1 (0 or -1 = off)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 100, "must be in (0, 100]"),
            ("stop", all(s for s in self.stop), "stop strings must be non-empty"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "token ids must be >= 0"),
            ("min_tokens", self.min_tokens >= 0 and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
             "must be in 0..max_tokens"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"must be in 0..{MAX_LOGPROBS}"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be in 0..2^63-1"),
            ("output_kind", self.output_kind in OUTPUT_KINDS, f"expected one of {', '.join(OUTPUT_KINDS)}"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise FieldError("SamplingParams: ", name, getattr(self, name), why)

    def _check_types(self) -> None:
        ints = ("n", "max_tokens", "top_k", "seed", "min_tokens", "logprobs")
        floats = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
        bools = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")
        for name in ints + floats:
            v = getattr(self, name)
            if v is None and name in ("max_tokens", "seed", "logprobs"):
                continue
            kinds = (int,) if name in ints else (int, float)
            if isinstance(v, bool) or not isinstance(v, kinds) or (isinstance(v, float) and not math.isfinite(v)):
                raise FieldError("SamplingParams: ", name, v,
                                 f"expected {'an integer' if name in ints else 'a finite number'}")
        for name in bools:
            if not isinstance(getattr(self, name), bool):
                raise FieldError("SamplingParams: ", name, getattr(self, name), "expected true or false")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise FieldError("SamplingParams: ", "stop", self.stop, "expected a string or a list of strings")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise FieldError("SamplingParams: ", "stop_token_ids", self.stop_token_ids, "expected a list of integers")
        if not isinstance(self.output_kind, str):
            raise FieldError("SamplingParams: ", "output_kind", self.output_kind, "expected a string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampled(NamedTuple):
    tokens: list[int]
    logprobs: list[float]  # of each sampled token, under the raw model distribution
    ranks: list[int]  # of each sampled token in that distribution (1 = most likely); 0 where no logprobs asked
    top: list[list[tuple[int, float]] | None]  # the top-N (id, logprob) of rows that asked for logprobs


class Sampler:
    """One call per step: logits [B, V] -> one token per row, with its logprob under the raw model distribution
    (before penalties and temperature, as vLLM reports them). Rows without a seed of their own draw from
    `generator` (the engine's, seeded by EngineConfig.seed), so a run is reproducible as a whole."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    @torch.inference_mode()
    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        history: Sequence[Sequence[int]],
        prompt_lens: Sequence[int] | None = None,
        suppress: Sequence[Sequence[int]] | None = None,
    ) -> Sampled:
        """history: each row's prompt then output ids; prompt_lens: where its output starts (penalties on
        outputs only); suppress: token ids a row may not sample now (eos and stop ids before min_tokens)."""
        logits = logits.float()
        logprobs_all = torch.log_softmax(logits, dim=-1)
        logits = apply_penalties(logits, params, history, prompt_lens or [0] * len(params))
        for i, ids in enumerate(suppress or []):
            if ids:
                logits[i, torch.tensor(list(ids), device=logits.device)] = float("-inf")
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            probs = filtered_probs(logits[rows], [params[i] for i in sampled])
            tokens[rows] = draw(probs, [generators[i] for i in sampled], self.generator)
        chosen = logprobs_all.gather(1, tokens[:, None])
        top: list[list[tuple[int, float]] | None] = [None] * len(params)
        ranks = [0] * len(params)  # only rows that asked for logprobs report a rank
        if any(p.logprobs is not None for p in params):
            ranks = ((logprobs_all > chosen).sum(-1) + 1).tolist()
        wanted = [i for i, p in enumerate(params) if p.logprobs]
        if wanted:
            k = max(params[i].logprobs for i in wanted)
            values, ids = logprobs_all[torch.tensor(wanted, device=logits.device)].topk(k, dim=-1)
            for row, i in enumerate(wanted):
                n = params[i].logprobs
                top[i] = list(zip(ids[row, :n].tolist(), values[row, :n].tolist()))
        return Sampled(tokens.tolist(), chosen[:, 0].tolist(), ranks, top)


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], history: Sequence[Sequence[int]],
                    prompt_lens: Sequence[int]) -> torch.Tensor:
    """Repetition penalty over prompt and output (divide positive logits, multiply negative ones); presence and
    frequency penalties over output tokens only (subtract once per distinct token, and once per occurrence)."""
    for i, p in enumerate(params):
        if p.repetition_penalty != 1.0 and history[i]:
            ids = torch.tensor(sorted(set(history[i])), device=logits.device, dtype=torch.long)
            seen = logits[i, ids]
            logits[i, ids] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and len(history[i]) > prompt_lens[i]:
            out = torch.tensor(list(history[i][prompt_lens[i]:]), device=logits.device, dtype=torch.long)
            counts = torch.bincount(out, minlength=logits.shape[1])[: logits.shape[1]].float()
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as masks on the sorted distribution; rows renormalised."""
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], device=dev)[:, None]
    probs = torch.softmax(logits / temp, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[1], device=dev)[None]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else probs.shape[1] for p in params], device=dev)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
    keep = (rank < top_k) & (before < top_p) & (sorted_p >= min_p * sorted_p[:, :1])
    keep[:, 0] = True
    sorted_p = sorted_p * keep
    out = torch.zeros_like(probs).scatter_(1, order, sorted_p)
    return out / out.sum(-1, keepdim=True)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None],
         shared: torch.Generator | None = None) -> torch.Tensor:
    """Exponential-race sampling (argmax p / E, E ~ Exp(1)). Unseeded rows share one draw (from `shared`); a
    seeded row uses its own generator, so its samples do not depend on what else is in the batch."""
    noise = torch.empty_like(probs).exponential_(generator=shared)
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    return (probs / noise).argmax(dim=-1)
