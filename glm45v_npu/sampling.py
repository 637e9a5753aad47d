"""SamplingParams and the batched sampler (per-request parameters, on the logits' device)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import Glm45vError


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be >= -1 (0 or -1 = off)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(s for s in self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise Glm45vError(f"SamplingParams: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """One call per step: logits [B, V] -> tokens [B] (and their logprobs under the raw model distribution)."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        history: Sequence[Sequence[int]],
    ) -> tuple[list[int], list[float]]:
        logits = logits.float()
        logprobs_all = torch.log_softmax(logits, dim=-1)
        logits = self._repetition_penalty(logits, params, history)
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            probs = filtered_probs(logits[rows], [params[i] for i in sampled])
            tokens[rows] = draw(probs, [generators[i] for i in sampled])
        chosen = logprobs_all.gather(1, tokens[:, None])[:, 0]
        return tokens.tolist(), chosen.tolist()

    @staticmethod
    def _repetition_penalty(logits, params, history) -> torch.Tensor:
        rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        for i in rows:
            ids = torch.tensor(sorted(set(history[i])), device=logits.device, dtype=torch.long)
            seen = logits[i, ids]
            penalty = params[i].repetition_penalty
            logits[i, ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
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


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Exponential-race sampling (argmax p / E, E ~ Exp(1)). Unseeded rows share one draw; a seeded row uses its
    own generator, so its samples do not depend on what else is in the batch."""
    noise = torch.empty_like(probs).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    return (probs / noise).argmax(dim=-1)
