"""Robustness: odd images, bad options, failing steps, the KV budget, dummy weights across ranks, hub failures."""

import logging

import pytest
import torch
import triton
import triton.language as tl
from PIL import Image

from glm45v_npu import LLM, SamplingParams
from glm45v_npu.engine.config import EngineConfig
from glm45v_npu.errors import FieldError, Glm45vError
from glm45v_npu.kernels.paged_attention import row_offset
from tests.tiny import IMAGE_TOKEN, make_vl_checkpoint, random_image


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hardening")
    make_vl_checkpoint(path, "gqa2-hd32-half-rope", seed=31)
    return path


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, block_size=4, kv_cache_gib=0.002)


def _clean(llm):
    s = llm.stats()
    return s.requests == 0 and s.running == 0 and s.waiting == 0 and s.free_blocks == s.num_blocks


# --- 1. images transformers refuses ------------------------------------------------------------------------


def test_refused_image_is_named_and_leaves_the_engine_clean(llm, tmp_path):
    thin = tmp_path / "thin.png"
    Image.new("RGB", (3, 900), (10, 200, 30)).save(thin)
    good = {"prompt_token_ids": [5, IMAGE_TOKEN, 6], "images": [random_image(60, 40, 1)]}
    bad = {"prompt_token_ids": [5, IMAGE_TOKEN, 6], "images": [str(thin)]}
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    outs = llm.generate([good, bad, good], params)
    assert outs[1].error and "thin.png" in outs[1].error and "aspect ratio" in outs[1].error
    assert [len(o.outputs[0].token_ids) for o in (outs[0], outs[2])] == [3, 3]
    assert _clean(llm)
    with pytest.raises(Glm45vError, match="thin.png: the image processor refuses it"):
        llm.add_request(bad, params)
    assert _clean(llm)


def test_interrupted_generate_leaves_nothing_queued(llm, monkeypatch):
    calls = {"n": 0}
    real = llm.engine.runner.execute

    def interrupted(inputs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(inputs)

    monkeypatch.setattr(llm.engine.runner, "execute", interrupted)
    reqs = [{"prompt_token_ids": [5 + i, 6, 7]} for i in range(4)]
    with pytest.raises(KeyboardInterrupt):
        llm.generate(reqs, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert _clean(llm)
    monkeypatch.setattr(llm.engine.runner, "execute", real)
    outs = llm.generate(reqs, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 5 for o in outs)  # the next call gets exactly its own requests


# --- 2. every engine size checked up front -----------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("block_size", 0), ("block_size", -4), ("block_size", 2.5), ("kv_cache_gib", 0), ("kv_cache_gib", float("nan")),
    ("max_num_seqs", 0), ("max_num_batched_tokens", 0), ("max_model_len", 1), ("gpu_memory_utilization", 0),
    ("gpu_memory_utilization", 1.5), ("tensor_parallel_size", 0), ("max_pixels", 10), ("num_layers", 0),
    ("load_format", "pt"), ("max_num_seqs", True), ("max_num_seqs", "8"), ("dist_timeout_s", 0),
    ("limit_mm_per_prompt", {"audio": 1}), ("generation_config", "hf"),
])
def test_engine_config_names_the_bad_field(field, value):
    with pytest.raises(FieldError) as e:
        EngineConfig(model="tiny-random", **{field: value})
    assert e.value.field == field and field in str(e.value)


def test_llm_refuses_zero_sizes_before_loading(ckpt):
    for kwargs in (dict(max_num_seqs=0), dict(block_size=0), dict(max_num_batched_tokens=0)):
        with pytest.raises(FieldError, match=next(iter(kwargs))):
            LLM(ckpt, **kwargs)


# --- 3. a failed step is rolled back -----------------------------------------------------------------------


def _requests():
    return [
        {"prompt_token_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13]},
        {"prompt_token_ids": [14, IMAGE_TOKEN, 15, 16], "images": [random_image(70, 50, 2)]},
        {"prompt_token_ids": [17, IMAGE_TOKEN, 18, IMAGE_TOKEN, 19],
         "images": [random_image(40, 90, 3), random_image(30, 30, 4)]},
    ]


@pytest.mark.parametrize("where", ["vision", "model", "interrupt"])
def test_failed_step_changes_nothing_and_the_engine_goes_on(ckpt, where, monkeypatch):
    """A step that fails (out of memory, Ctrl-C) commits nothing: a failure is absorbed (its requests are retried
    one at a time), an interrupt reaches the caller; either way every request ends as in a clean run."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    clean = LLM(ckpt, block_size=4, kv_cache_gib=0.002, max_num_batched_tokens=8).generate(_requests(), params)
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.002, max_num_batched_tokens=8)  # chunked: images span steps
    model = llm.engine.runner.model
    target, name = (model, "encode_images") if where == "vision" else (model, "forward")
    real = getattr(target, name)
    calls = {"n": 0, "failed": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (2, 4):  # a batched step, then one that a request runs on its own after it
            calls["failed"] += 1
            raise KeyboardInterrupt if where == "interrupt" else RuntimeError("injected failure (out of memory)")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, flaky)
    ids = [llm.add_request(r, params) for r in _requests()]
    finals, raised = {}, 0
    while llm.has_unfinished():
        try:
            outs = llm.step()
        except KeyboardInterrupt:
            raised += 1
            continue
        finals.update({o.request_id: o for o in outs if o.finished})
    assert calls["failed"] == 2 and raised == (2 if where == "interrupt" else 0)
    for rid, want in zip(ids, clean):
        assert finals[rid].error is None
        got, want = finals[rid].outputs[0], want.outputs[0]
        assert got.token_ids == want.token_ids
        assert torch.allclose(torch.tensor([d[t].logprob for d, t in zip(got.logprobs, got.token_ids)]),
                              torch.tensor([d[t].logprob for d, t in zip(want.logprobs, want.token_ids)]), atol=1e-5)
    assert _clean(llm) and llm.engine.runner.image_embeds == {}


# --- 5. the KV budget on an accelerator --------------------------------------------------------------------


def test_kv_budget_from_free_memory_minus_a_warmup_with_the_largest_image(ckpt, monkeypatch, caplog):
    """On a CPU with the accelerator's memory queries faked: the budget is usable memory minus what is in use
    after loading minus the warm-up peak, and the warm-up ran the largest image, the largest prefill and the
    sampler over max_num_seqs rows."""
    from glm45v_npu import platform
    from glm45v_npu.engine.memory import WarmupStep, accelerator_kv_budget
    from glm45v_npu.engine.runner import ModelRunner

    gib = 2**30
    monkeypatch.setattr(platform, "memory_info", lambda d: (30 * gib, 80 * gib))
    monkeypatch.setattr(platform, "allocated_memory", lambda d: 2 * gib)
    monkeypatch.setattr(platform, "reset_peak_memory", lambda d: None)
    monkeypatch.setattr(platform, "peak_memory", lambda d: 2 * gib + 3 * gib)  # 3 GiB of activations
    seen = {}
    real_execute = ModelRunner.execute

    def spy(self, inputs):
        seen["encode"] = [(g, p.shape) for _, ps, gs in inputs.encode for g, p in zip(gs, ps)]
        seen["tokens"] = len(inputs.token_ids)
        logits = real_execute(self, inputs)
        seen["rows"] = logits.shape[0]
        return logits

    monkeypatch.setattr(ModelRunner, "execute", spy)
    config = EngineConfig(model=str(ckpt), max_num_seqs=5, max_num_batched_tokens=40, gpu_memory_utilization=0.5,
                          enforce_eager=True)  # no graphs here: the next test counts them
    from glm45v_npu.inputs.processor import Processor
    from glm45v_npu.model.glm4v_moe import load_model
    from glm45v_npu.model.hf_config import load_config

    cfg = load_config(ckpt)
    patches = Processor(ckpt, cfg).max_image_patches
    model = load_model(ckpt, cfg, torch.float32, "cpu")
    with caplog.at_level(logging.INFO, logger="glm45v_npu"):
        budget = accelerator_kv_budget(model, config, WarmupStep.of(config, cfg, patches), torch.device("cpu"))
    assert budget == 0.5 * 80 * gib - (80 - 30) * gib - 3 * gib
    (grid, shape), = seen["encode"]
    assert grid[1] * grid[2] <= patches < (grid[1] + 2) * (grid[2] + 2) and shape[0] == grid[1] * grid[2]
    assert seen["tokens"] == 40 and seen["rows"] == 5
    assert "warm-up peak" in caplog.text and "for the KV cache" in caplog.text


def test_decode_graph_memory_is_counted_before_the_kv_cache(ckpt, monkeypatch, caplog):
    """With graphs on, the budget also leaves room for them: static inputs (from their shapes), the pool of their
    capture (a dry run of the largest bucket, measured above what is held) and every bucket's logits."""
    from glm45v_npu import platform
    from glm45v_npu.engine.graph import DecodeGraphs, buckets_for
    from glm45v_npu.engine.memory import WarmupStep, accelerator_kv_budget, decode_graph_bytes
    from glm45v_npu.model.glm4v_moe import load_model
    from glm45v_npu.model.hf_config import load_config

    gib = 2**30
    monkeypatch.setattr(platform, "memory_info", lambda d: (30 * gib, 80 * gib))
    monkeypatch.setattr(platform, "allocated_memory", lambda d: 2 * gib)
    monkeypatch.setattr(platform, "reset_peak_memory", lambda d: None)
    monkeypatch.setattr(platform, "peak_memory", lambda d: 2 * gib + 3 * gib)
    dry_runs = []
    real_forward = DecodeGraphs.forward
    monkeypatch.setattr(DecodeGraphs, "forward", lambda self, b: (dry_runs.append(b), real_forward(self, b))[1])
    cfg = load_config(ckpt)
    model = load_model(ckpt, cfg, torch.float32, "cpu")
    config = EngineConfig(model=str(ckpt), max_num_seqs=40, max_num_batched_tokens=40, gpu_memory_utilization=0.5,
                          max_model_len=512, block_size=4)
    warmup = WarmupStep.of(config, cfg, 0)
    assert warmup.graph_buckets == buckets_for(40) and warmup.graph_width == 128
    graphs = decode_graph_bytes(model, warmup, torch.device("cpu"))
    assert dry_runs == [40]  # the largest bucket, once
    real = DecodeGraphs(model, 40, 128, 4, torch.device("cpu"), capture=False).buffers()
    assert graphs.static == sum(t.numel() * t.element_size() for t in real.values()) >= 40 * 128 * 4
    assert graphs.step_peak == 3 * gib
    assert graphs.logits == (sum(buckets_for(40)) - 40) * cfg.text.vocab_size * 4
    with caplog.at_level(logging.INFO, logger="glm45v_npu"):
        budget = accelerator_kv_budget(model, config, warmup, torch.device("cpu"))
    assert budget == 0.5 * 80 * gib - 50 * gib - 3 * gib - graphs.total
    assert "decode graphs (8 buckets up to 40" in caplog.text
    eager = WarmupStep.of(EngineConfig(model=str(ckpt), enforce_eager=True), cfg, 0)
    assert decode_graph_bytes(model, eager, torch.device("cpu")).total == 0


# --- 6. prefix-cache hits counted once ---------------------------------------------------------------------


def test_prefix_hits_count_each_admission_once(ckpt):
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.002, max_num_seqs=1)
    shared = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    llm.generate({"prompt_token_ids": shared}, params)
    base = llm.stats().prefix_cache_hit_tokens
    outs = llm.generate([{"prompt_token_ids": shared + [20 + i]} for i in range(3)], params)
    # max_num_seqs=1: the queue head waits for 8 steps per request, but its 8 cached tokens count once
    assert llm.stats().prefix_cache_hit_tokens - base == sum(o.num_cached_tokens for o in outs) == 3 * 8


# --- 7. dummy weights equal across ranks where the tensor is shared -----------------------------------------


def test_dummy_weights_are_seeded_by_tensor_name():
    from glm45v_npu.model.glm4v_moe import build_model
    from glm45v_npu.model.hf_config import load_config
    from glm45v_npu.model.hub import resolve_model
    from glm45v_npu.model.loader import init_dummy_weights
    from glm45v_npu.parallel.layout import Layout

    cfg = load_config(resolve_model("tiny-random")[0])
    models = []
    for rank in (0, 1):
        m = build_model(cfg, torch.float32, "cpu", Layout(rank, 4))  # 2 KV heads over 4 ranks: replicated
        init_dummy_weights(m, seed=0)
        models.append(dict(m.named_parameters()))
    a, b = models
    shared = [n for n in a if n.startswith("visual.") or ".mlp.gate." in n or "norm" in n]
    assert shared and all(torch.equal(a[n], b[n]) for n in shared)
    kv = a["language_model.layers.0.self_attn.qkv_proj.weight"].shape[0] - 32  # ranks 0 and 1 share KV head 0
    assert torch.equal(a["language_model.layers.0.self_attn.qkv_proj.weight"][-kv:],
                       b["language_model.layers.0.self_attn.qkv_proj.weight"][-kv:])
    assert not torch.equal(a["language_model.layers.0.self_attn.o_proj.weight"],
                           a["language_model.layers.1.self_attn.o_proj.weight"])  # different tensors differ


# --- 8. hub failures say which ------------------------------------------------------------------------------


def _http_error(cls, status):
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/x"))
    return cls("boom", response=response)


@pytest.mark.parametrize("kind, message", [
    ("gated", "is gated: accept its terms"),
    ("missing", "no such repository"),
    ("revision", "revision 'v9' does not exist"),
    ("auth", "HTTP 401"),
    ("disk", "disk is full"),
    ("offline", "cannot reach the Hugging Face hub"),
])
def test_hub_failures_are_told_apart(monkeypatch, kind, message):
    import errno

    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from glm45v_npu.model.hub import resolve_model

    error = {"gated": lambda: _http_error(GatedRepoError, 403), "missing": lambda: _http_error(RepositoryNotFoundError, 404),
             "revision": lambda: _http_error(RevisionNotFoundError, 404), "auth": lambda: _http_error(HfHubHTTPError, 401),
             "disk": lambda: OSError(errno.ENOSPC, "No space left on device"),
             "offline": lambda: LocalEntryNotFoundError("no connection")}[kind]()

    def fail(*a, **k):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(Glm45vError, match=message) as e:
        resolve_model("someorg/some-model", revision="v9")
    assert "someorg/some-model" in str(e.value)


# --- 4. 64-bit offsets into a cache past 2^31 elements -------------------------------------------------------


def test_attention_reads_a_cache_larger_than_2_to_the_31_elements():
    """A bf16 cache of 2^31 + elements per tensor, allocated lazily (only the pages touched become memory): the
    Triton kernels must read blocks whose element offsets pass 2^31, where int32 offsets wrap."""
    from glm45v_npu.kernels.paged_attention import paged_attention_torch, paged_attention_triton
    from glm45v_npu.model.context import ForwardContext

    nkv, hd, bs = 1, 128, 16
    num_blocks = 2**31 // (bs * nkv * hd) + 64  # past 2^31 elements
    k_cache = torch.empty(num_blocks, bs, nkv, hd, dtype=torch.bfloat16)
    v_cache = torch.empty_like(k_cache)
    high = list(range(num_blocks - 40, num_blocks - 30))  # offsets of these blocks are past 2^31
    g = torch.Generator().manual_seed(0)
    for b in high:
        k_cache[b] = torch.randn(bs, nkv, hd, generator=g).to(torch.bfloat16)
        v_cache[b] = torch.randn(bs, nkv, hd, generator=g).to(torch.bfloat16)
    assert high[0] * bs * nkv * hd > 2**31
    for q_lens, ctx_lens in (([1, 1], [150, 37]), ([5, 3], [150, 37])):  # decode, then a prefill/extend batch
        ctx = ForwardContext.build(q_lens, ctx_lens, [high, high[3:6]], bs).attn
        q = torch.randn(sum(q_lens), 4, hd, generator=g).to(torch.bfloat16)
        want = paged_attention_torch(q.double(), k_cache, v_cache, ctx, hd**-0.5)
        got = paged_attention_triton(q, k_cache, v_cache, ctx, hd**-0.5)
        assert (got.double() - want).abs().max() < 3e-2


@triton.jit
def _probe_row_offset(rows, out, WIDTH: tl.constexpr):
    i = tl.arange(0, 4)
    tl.store(out + i, row_offset(tl.load(rows + i), WIDTH))


def test_prefill_query_offsets_are_64_bit():
    """Query/output row offsets (token index x heads x head_dim) pass 2^31 beyond ~170k tokens in one step for
    GLM-4.5V on one device: the kernels' offset helper computes them in 64 bits."""
    rows = torch.tensor([0, 1, 174_763, 2_000_000], dtype=torch.int32)
    out = torch.zeros(4, dtype=torch.int64)
    _probe_row_offset[(1,)](rows, out, WIDTH=96 * 128)
    assert out.tolist() == [r * 96 * 128 for r in rows.tolist()]


def test_info_on_a_hub_id_fetches_config_files_only(monkeypatch, tmp_path):
    import shutil

    import huggingface_hub

    from glm45v_npu.apps.info import render_info
    from glm45v_npu.model.hf_config import builtin_config

    asked = {}

    def snapshot(repo, revision=None, cache_dir=None, allow_patterns=None):
        asked.update(repo=repo, patterns=allow_patterns)
        shutil.copy(builtin_config("glm-4.5v"), tmp_path / "config.json")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    render_info("zai-org/GLM-4.5V", "cpu")
    assert asked["repo"] == "zai-org/GLM-4.5V"
    assert all(p.endswith(".json") for p in asked["patterns"]) and not any("safetensors" in p for p in asked["patterns"])
