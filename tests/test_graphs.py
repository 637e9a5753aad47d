"""The decode-graph path run eagerly on a CPU: the same static buffers and padding a captured graph uses must
give the plain decode's tokens and logprobs, store no KV for padding rows and route them to no expert."""

import pytest
import torch

from glm45v_npu import LLM, SamplingParams
from glm45v_npu.engine.graph import buckets_for
from glm45v_npu.kernels import ops
from tests.tiny import IMAGE_TOKEN, make_vl_checkpoint, random_image


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("graphs")
    make_vl_checkpoint(path, "gqa3-hd16-full-rope", seed=61)
    return path


def _requests(n):
    out = []
    for i in range(n):
        ids = [5 + (7 * i + j) % 200 for j in range(3 + i % 5)]
        images = []
        if i % 3 == 0:
            ids.insert(1, IMAGE_TOKEN)
            images = [random_image(40 + 4 * i, 56, i)]
        out.append({"prompt_token_ids": ids, "images": images})
    return out


def _run(ckpt, requests, static: bool):
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004, max_num_seqs=24, max_num_batched_tokens=256)
    used = []
    if static:
        runner = llm.engine.runner
        runner.enable_decode_graphs(24, llm.engine.max_model_len, capture=False)
        real = runner.graphs.run
        runner.graphs.run = lambda bucket: (used.append(bucket), real(bucket))[1]
    # different lengths: the batch shrinks during decode and crosses bucket boundaries
    params = [SamplingParams(max_tokens=3 + (i * 5) % 11, temperature=0, ignore_eos=True, logprobs=0)
              for i in range(len(requests))]
    return llm.generate(requests, params), used


@pytest.mark.parametrize("n", [3, 5, 17])
def test_static_buffer_decode_equals_plain_decode(ckpt, n):
    requests = _requests(n)
    plain, _ = _run(ckpt, requests, static=False)
    static, buckets = _run(ckpt, requests, static=True)
    assert buckets and set(buckets) <= set(buckets_for(24))
    if n == 17:
        assert {24, 16, 8} <= set(buckets)  # bucket changes mid-generation
    for a, b in zip(plain, static):
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids == b.token_ids
        assert max(abs(x[t].logprob - y[t].logprob) for x, y, t in zip(a.logprobs, b.logprobs, a.token_ids)) <= 1e-5


def test_padding_rows_store_nothing_and_route_nowhere(ckpt, monkeypatch):
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004, max_num_seqs=8)
    runner = llm.engine.runner
    runner.enable_decode_graphs(8, llm.engine.max_model_len, capture=False)
    seen_ids = []
    real = ops.impl

    def spy(op, device):
        fn = real(op, device)
        if op == "fused_moe":
            return lambda x, w13, w2, w, ids: (seen_ids.append(ids.clone()), fn(x, w13, w2, w, ids))[1]
        return fn

    monkeypatch.setattr(ops, "impl", spy)
    tables = [[3, 4], [7], [9, 10]]
    before = [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in runner.model.attention_layers()]
    bucket = runner.graphs.load([11, 12, 13], torch.tensor([[5, 2, 6]] * 3), [6, 3, 7], tables)
    assert bucket == 4
    logits = runner.graphs.run(bucket)
    assert torch.isfinite(logits[:3]).all()
    written = {4 * 4 + 1, 7 * 4 + 2, 10 * 4 + 2}  # positions 5, 2, 6: blocks 4, 7, 10
    for (k0, v0), layer in zip(before, runner.model.attention_layers()):
        for old, new in ((k0, layer.k_cache), (v0, layer.v_cache)):
            changed = {int(s) for s in ((old != new).flatten(2).any(-1).flatten().nonzero().flatten())}
            assert changed <= written
    E = llm.model_config.text.n_routed_experts
    assert seen_ids and all(bool((ids[3:] == E).all()) and bool((ids[:3] < E).all()) for ids in seen_ids)


def test_buckets():
    assert buckets_for(64) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert buckets_for(20) == (1, 2, 4, 8, 16, 20)
    assert buckets_for(256) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
