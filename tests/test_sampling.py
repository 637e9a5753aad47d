"""Sampler definitions on a fixed distribution, seeds, and incremental detokenisation."""

import pytest
import torch

from glm45v_npu.engine.detokenizer import IncrementalDetokenizer
from glm45v_npu.engine.sampler import Sampler, filtered_probs
from glm45v_npu.errors import Glm45vError
from glm45v_npu.sampling_params import SamplingParams

PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
LOGITS = PROBS.log()
N = 20000


def _samples(params: SamplingParams, n: int = N) -> torch.Tensor:
    """n draws from one distribution, as one batch of n rows with seeded generators."""
    g = torch.Generator().manual_seed(0)
    tokens = Sampler()(LOGITS.expand(n, -1).clone(), [params] * n, [g] * n, [[]] * n).tokens
    return torch.bincount(torch.tensor(tokens), minlength=6).float() / n


def _expect(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum()


def _close(freq, expected):
    # 5 standard errors of a binomial proportion at N draws
    tol = 5 * (expected * (1 - expected) / N).sqrt() + 1e-9
    assert ((freq - expected).abs() <= tol).all(), (freq, expected)


def test_temperature_one_follows_the_distribution():
    _close(_samples(SamplingParams(temperature=1.0)), PROBS)


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        _close(_samples(SamplingParams(temperature=t)), _expect(PROBS ** (1 / t)))


def test_top_k_keeps_k_most_likely():
    _close(_samples(SamplingParams(top_k=2)), _expect(PROBS * torch.tensor([1, 1, 0, 0, 0, 0.0])))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # cumulative 0.4, 0.65, 0.8: top_p 0.7 keeps the first three
    _close(_samples(SamplingParams(top_p=0.7)), _expect(PROBS * torch.tensor([1, 1, 1, 0, 0, 0.0])))


def test_min_p_drops_tokens_below_fraction_of_max():
    # min_p 0.3 -> threshold 0.12: keeps 0.4, 0.25, 0.15
    _close(_samples(SamplingParams(min_p=0.3)), _expect(PROBS * torch.tensor([1, 1, 1, 0, 0, 0.0])))


def test_filters_compose():
    p = filtered_probs(LOGITS[None], [SamplingParams(top_k=3, top_p=0.5)])[0]
    assert torch.allclose(p, _expect(PROBS * torch.tensor([1, 1, 0, 0, 0, 0.0])))


def test_greedy_is_argmax_and_logprob_is_raw():
    logits = torch.randn(5, 50)
    tokens, lps, ranks, _ = Sampler()(logits.clone(), [SamplingParams(temperature=0, logprobs=0)] * 5, [None] * 5,
                                      [[]] * 5)
    assert ranks == [1] * 5
    assert tokens == logits.argmax(-1).tolist()
    assert torch.allclose(torch.tensor(lps), torch.log_softmax(logits, -1).max(-1).values)


def test_equal_seeds_equal_samples():
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(30):
            out += Sampler()(torch.randn(1, 100, generator=torch.Generator().manual_seed(len(out))),
                             [SamplingParams(temperature=1.0)], [g], [[]]).tokens
        return out

    assert run(7) == run(7) and run(7) != run(8)


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 1.9]])
    tokens = Sampler()(logits.clone(), [SamplingParams(temperature=0, repetition_penalty=1.5)], [None], [[0]]).tokens
    assert tokens == [2]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(min_p=2)])
def test_bad_params_are_named(bad):
    with pytest.raises(Glm45vError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_incremental_detokenizer_is_utf8_safe(tmp_path):
    from transformers import AutoTokenizer

    from glm45v_npu.testing.tiny_random import save_tokenizer

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "héllo 你好 🙂 done<|image|>x"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True, stop=[])
    pieces = []
    for i in ids:
        detok.add(i)
        pieces.append(detok.delta(final=False))
    detok.finish()
    pieces.append(detok.delta(final=True))
    assert "".join(pieces) == "héllo 你好 🙂 donex"
    assert all("\ufffd" not in p for p in pieces)
    keep = IncrementalDetokenizer(tok, skip_special_tokens=False, stop=["你好"])
    for i in ids:
        keep.add(i)
        if keep.stopped:
            break
    assert keep.text == "héllo " and keep.delta(final=True) == "héllo "


def test_presence_and_frequency_penalties_act_on_generated_tokens_only():
    logits = torch.tensor([[3.0, 2.5, 0.0, 1.0]])
    prompt_then_output = [[1, 1, 1, 0, 0]]  # token 1 only in the prompt, token 0 generated twice
    pick = lambda **kw: Sampler()(logits.clone(), [SamplingParams(temperature=0, **kw)], [None],  # noqa: E731
                                  prompt_then_output, [3]).tokens[0]
    assert pick() == 0
    assert pick(presence_penalty=0.4) == 0 and pick(presence_penalty=0.6) == 1  # 3 - 0.6 < 2.5
    assert pick(frequency_penalty=0.2) == 0 and pick(frequency_penalty=0.3) == 1  # 3 - 2 x 0.3 < 2.5
    assert pick(repetition_penalty=1.3) == 0  # repetition counts the prompt: 2.5 / 1.3 < 3 / 1.3


def test_min_tokens_keeps_stop_ids_away():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    sampled = Sampler()(logits.clone(), [SamplingParams(temperature=0, logprobs=0)], [None], [[]], [0], [[1]])
    assert sampled.tokens == [2] and sampled.ranks == [2]  # the suppressed eos would have been first


def test_top_logprobs_and_ranks():
    logits = torch.tensor([[0.1, 2.0, 1.0, 3.0]])
    s = Sampler()(logits.clone(), [SamplingParams(temperature=0, logprobs=2)], [None], [[]])
    lp = torch.log_softmax(logits, -1)[0]
    assert s.tokens == [3] and s.ranks == [1] and [t for t, _ in s.top[0]] == [3, 1]
    assert all(abs(v - float(lp[t])) < 1e-6 for t, v in s.top[0])
