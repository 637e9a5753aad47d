"""The batched sampler: logits -> one token per row, with each request's own parameters, on the logits' device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..sampling_params import SamplingParams
from .grammar import apply_bitmask


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
        allowed: torch.Tensor | None = None,
    ) -> Sampled:
        """history: each row's prompt then output ids; prompt_lens: where its output starts (penalties on
        outputs only); suppress: token ids a row may not sample now (eos and stop ids before min_tokens);
        allowed: the structured-output token bitmask of the rows (engine/grammar.py), after penalties."""
        raw = logits.float()  # logprobs are the model's, before penalties and masks
        lse = torch.logsumexp(raw, dim=-1, keepdim=True)  # one pass; the full log_softmax only when asked for
        edits = allowed is not None or any(suppress or []) or any(
            p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params)
        logits = raw.clone() if edits else raw
        logits = apply_penalties(logits, params, history, prompt_lens or [0] * len(params))
        for i, ids in enumerate(suppress or []):
            if ids:
                logits[i, torch.tensor(list(ids), device=logits.device)] = float("-inf")
        if allowed is not None:
            apply_bitmask(logits, allowed)
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            probs = filtered_probs(logits[rows], [params[i] for i in sampled])
            tokens[rows] = draw(probs, [generators[i] for i in sampled], self.generator)
        chosen = raw.gather(1, tokens[:, None]) - lse
        top: list[list[tuple[int, float]] | None] = [None] * len(params)
        ranks = [0] * len(params)  # only rows that asked for logprobs report a rank
        if any(p.logprobs is not None for p in params):
            logprobs_all = raw - lse
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
    top_k = torch.tensor([min(p.top_k, probs.shape[1]) if p.top_k > 0 else probs.shape[1] for p in params],
                         device=dev)[:, None]
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
