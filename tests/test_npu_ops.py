"""torch_npu fast paths wired to a stand-in torch_npu that implements each op as documented: layouts, dtypes,
index conventions and length lists must give the twins' results; the self-check falls back when they do not;
and a whole engine run with every op on its torch_npu path equals the portable run token for token."""

import pytest
import torch

from glm45v_npu.kernels import npu_ops, ops
from glm45v_npu.kernels.fused_moe import fused_moe_torch
from glm45v_npu.kernels.kv_cache import store_kv_torch
from glm45v_npu.kernels.paged_attention import paged_attention_torch
from glm45v_npu.kernels.reference import apply_rope, rms_norm
from glm45v_npu.kernels.rms_norm import add_rms_norm_torch
from glm45v_npu.kernels.router import route_torch
from glm45v_npu.model.context import ForwardContext


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_store_kv(fake):
    k, v = torch.randn(6, 2, 16, generator=_g()), torch.randn(6, 2, 16, generator=_g(1))
    slots = torch.tensor([0, 5, 9, -1, 14, 3])
    got = [torch.zeros(4, 4, 2, 16) for _ in range(2)]
    want = [torch.zeros(4, 4, 2, 16) for _ in range(2)]
    npu_ops.store_kv(k, v, *got, slots)
    store_kv_torch(k, v, *want, slots)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("q_lens, ctx_lens", [([1, 1, 1], [5, 40, 17]), ([7, 20, 1], [7, 29, 12])])
def test_paged_attention_tnd_layout(fake, q_lens, ctx_lens):
    nq, nkv, hd, bs = 8, 2, 16, 4
    blocks = sum(-(-c // bs) for c in ctx_lens) + 2
    perm = torch.randperm(blocks, generator=_g()).tolist()
    tables = []
    for c in ctx_lens:
        tables.append(perm[: -(-c // bs)])
        perm = perm[-(-c // bs):]
    meta = ForwardContext.build(q_lens, ctx_lens, tables, bs).attn
    kc, vc = torch.randn(blocks, bs, nkv, hd, generator=_g(1)), torch.randn(blocks, bs, nkv, hd, generator=_g(2))
    q = torch.randn(sum(q_lens), nq, hd, generator=_g(3))
    got = npu_ops.paged_attention(q, kc, vc, meta, hd**-0.5)
    want = paged_attention_torch(q, kc, vc, meta, hd**-0.5)
    assert torch.allclose(got, want, atol=1e-5)


def test_rms_norm_and_rotary(fake):
    x = torch.randn(5, 3, 16, generator=_g())
    w, b = torch.randn(16, generator=_g(1)), torch.randn(16, generator=_g(2))
    assert torch.allclose(npu_ops.rms_norm(x, w, 1e-5, b), rms_norm(x, w, 1e-5, b), atol=1e-5)
    angles = torch.randn(5, 4, generator=_g(3))
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # rotary dim 8 of 16
    assert torch.allclose(npu_ops.apply_rope(x, cos, sin), apply_rope(x, cos, sin), atol=1e-6)
    x2, r = x.view(15, 16), torch.randn(15, 16, generator=_g(4))
    got, summed = npu_ops.add_rms_norm(x2, r, w, 1e-5)
    want, want_sum = add_rms_norm_torch(x2, r, w, 1e-5)
    assert torch.equal(summed, want_sum) and torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("E, k, groups, topk_group, scaling", [(128, 8, 1, 1, 1.0), (16, 4, 4, 2, 2.5)])
def test_routing(fake, E, k, groups, topk_group, scaling):
    logits = torch.randn(9, E, generator=_g()) * 2
    bias = torch.randn(E, generator=_g(1)) * 0.1
    w, ids = npu_ops.route(logits, bias, k, groups, topk_group, True, scaling)
    w0, ids0 = route_torch(logits, bias, k, groups, topk_group, True, scaling)
    assert torch.equal(ids, ids0) and torch.allclose(w, w0, atol=1e-6)
    with pytest.raises(NotImplementedError):  # no renormalisation: the portable path serves
        npu_ops.route(logits, bias, k, groups, topk_group, False, scaling)


@pytest.mark.parametrize("other_rank", [False, True])
def test_fused_moe_routing_chain(fake, other_rank):
    T, E, K, H, inter = 7, 8, 3, 32, 12
    x = torch.randn(T, H, generator=_g())
    w13 = torch.randn(E, 2 * inter, H, generator=_g(1)) * H**-0.5
    w2 = torch.randn(E, H, inter, generator=_g(2)) * inter**-0.5
    ids = torch.stack([torch.randperm(E, generator=_g(3 + t))[:K] for t in range(T)])
    if other_rank:  # expert-parallel: another rank's pairs come as id E
        ids[::2, 0] = E
    weights = torch.rand(T, K, generator=_g(9))
    got = npu_ops.fused_moe(x, w13, w2, weights, ids)
    want = fused_moe_torch(x, w13, w2, weights, ids)
    assert torch.allclose(got, want, atol=1e-5)
    assert fake.calls[-5:] == ["npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_swiglu", "npu_grouped_matmul",
                               "npu_moe_finalize_routing"]


def test_self_check_falls_back_once_with_one_warning(caplog):
    twin = lambda x: x * 2  # noqa: E731
    shape = lambda x: x.shape  # noqa: E731
    good = ops.SelfChecked("double", lambda x: x + x, twin, twin, shape)
    wrong = ops.SelfChecked("double", lambda x: x * 3, twin, twin, shape)
    broken = ops.SelfChecked("double", lambda x: 1 / 0, twin, twin, shape)
    x = torch.ones(3)
    with caplog.at_level("WARNING", logger="glm45v_npu"):
        assert torch.equal(good(x), x * 2) and good.verified
        assert torch.equal(wrong(x), x * 2) and wrong.verified is False
        assert torch.equal(broken(x), x * 2) and broken.verified is False
        wrong(x)
        broken(x)
    warnings = [r.message for r in caplog.records]
    assert len(warnings) == 2 and "disagrees" in warnings[0] and "failed its self-check" in warnings[1]


def test_in_place_op_is_checked_by_what_it_wrote():
    slots = torch.tensor([0, 3])
    k = torch.randn(2, 1, 4, generator=_g())
    lazy = ops.SelfChecked("store_kv", lambda *a: None, store_kv_torch, store_kv_torch, ops.CHECK_KIND["store_kv"],
                           written=ops._stored)
    caches = [torch.zeros(2, 2, 1, 4) for _ in range(2)]
    lazy(k, k, *caches, slots)
    assert lazy.verified is False and torch.equal(caches[0].view(-1, 1, 4)[slots], k)  # redone by the fallback


def test_engine_on_the_npu_paths_equals_the_portable_run(npu_everywhere, fake, tmp_path_factory, monkeypatch,
                                                          caplog):
    """Eager steps take the torch_npu ops; decode-graph steps (static buffers, run eagerly here) take the portable
    attention, since their lengths live on the device; routing without renormalisation is never offered to
    torch_npu. None of that is a failure: no warning, nothing given up."""
    from glm45v_npu import LLM, SamplingParams
    from tests.tiny import IMAGE_TOKEN, make_vl_checkpoint, random_image

    path = tmp_path_factory.mktemp("npu-engine")
    make_vl_checkpoint(path, "gqa3-hd16-full-rope", seed=51)  # group-limited routing, no renormalisation
    requests = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10]},
                {"prompt_token_ids": [11, IMAGE_TOKEN, 12], "images": [random_image(60, 40, 1)]}]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    llm = LLM(path, block_size=4, kv_cache_gib=0.002, max_num_batched_tokens=16, max_num_seqs=2)
    llm.engine.runner.enable_decode_graphs(2, llm.engine.max_model_len, capture=False)
    graph_steps = []
    real_run = llm.engine.runner.graphs.run
    llm.engine.runner.graphs.run = lambda bucket: (graph_steps.append(bucket), real_run(bucket))[1]
    with caplog.at_level("WARNING", logger="glm45v_npu"):
        npu_run = llm.generate(requests, params)
    attention_calls = fake.calls.count("npu_fused_infer_attention_score")
    wrappers = dict(npu_everywhere)
    monkeypatch.undo()
    plain = LLM(path, block_size=4, kv_cache_gib=0.002, max_num_batched_tokens=16).generate(requests, params)
    for a, b in zip(npu_run, plain):
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids == b.token_ids
        assert max(abs(x[t].logprob - y[t].logprob) for x, y, t in zip(a.logprobs, b.logprobs, a.token_ids)) < 1e-4
    assert {"npu_fused_infer_attention_score", "_npu_reshape_and_cache", "npu_rms_norm", "npu_rotary_mul",
            "npu_moe_init_routing_v2"} <= set(fake.calls)
    assert "npu_moe_gating_top_k" not in fake.calls
    for op in ("paged_attention", "store_kv", "rms_norm", "apply_rope", "fused_moe"):
        assert wrappers[op].verified, op
    assert wrappers["route"].verified is None  # never offered: this checkpoint has no renormalisation
    assert graph_steps and not caplog.records
    layers = len(llm.engine.runner.model.attention_layers())
    eager_steps = llm.stats().steps - len(graph_steps)
    assert attention_calls == layers * eager_steps  # graph steps did not call torch_npu's attention
