"""The engine end to end: greedy parity with transformers' generate under preemption, prefix caching,
block accounting, finish reasons."""

import random

import pytest
import torch

from glm45v_npu import LLM, SamplingParams
from glm45v_npu.errors import Glm45vError
from tests.harness import build_prompt, reference_logits
from tests.tiny import IMAGE_TOKEN, image_processor, make_text_checkpoint, make_vl_checkpoint, random_image


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine-vl")
    return path, make_vl_checkpoint(path, "gqa3-hd16-full-rope", seed=11)


@pytest.fixture(scope="module")
def text_qk(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine-text")
    return path, make_text_checkpoint(path, "qk-norm", seed=12)


def _reference_generate(ref, ids, images, n):
    from transformers import GenerationConfig

    kwargs = {}
    if images:
        px = image_processor()(images=images, return_tensors="pt")
        kwargs = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
    if hasattr(ref.model, "visual"):
        kwargs["mm_token_type_ids"] = (torch.tensor([ids]) == IMAGE_TOKEN).int()
    gen = GenerationConfig(max_new_tokens=n, min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        out = ref.generate(torch.tensor([ids]), generation_config=gen, **kwargs)
    return out[0, len(ids):].tolist()


def _requests(n_text_only: int, with_images: bool):
    """(request, images, expanded prompt ids): text-only and 1..3 images, different lengths."""
    image_sets = [[], [(90, 60)], [(40, 120), (20, 30)], [(112, 112), (17, 70), (84, 28)]] if with_images else []
    image_sets += [[]] * n_text_only
    out = []
    for i, sizes in enumerate(image_sets):
        images = [random_image(w, h, 10 * i + j) for j, (w, h) in enumerate(sizes)]
        grids = [tuple(g) for g in image_processor()(images=images)["image_grid_thw"].tolist()] if images else []
        expanded = build_prompt([3 + 4 * i] + [2 + i] * len(grids), grids, seed=100 + i)
        placeholder = []  # the same prompt with one placeholder per image, as a user would pass it
        run = False
        for t in expanded:
            if t == IMAGE_TOKEN:
                if not run:
                    placeholder.append(t)
                run = True
            else:
                placeholder.append(t)
                run = False
        out.append(({"prompt_token_ids": placeholder, "images": images}, images, expanded))
    return out


def token_logprobs(completion):
    """The sampled tokens' logprobs of a CompletionOutput."""
    return [entry[t].logprob for entry, t in zip(completion.logprobs, completion.token_ids)]


def _check_parity(path, ref, requests, max_tokens, **llm_kwargs):
    llm = LLM(path, block_size=4, **llm_kwargs)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0)
    outs = llm.generate([r for r, _, _ in requests], params)
    for out, (_, images, ids) in zip(outs, requests):
        c = out.outputs[0]
        assert out.error is None and c.finish_reason == "length"
        assert len(out.prompt_token_ids) == len(ids)
        assert c.token_ids == _reference_generate(ref, ids, images, max_tokens)
        logp = torch.log_softmax(reference_logits(ref, ids + c.token_ids[:-1], images)[len(ids) - 1 :], -1)
        expected = logp.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(token_logprobs(c)), expected, atol=2e-3)
    return llm


def test_greedy_matches_transformers_generate_under_preemption(vl):
    path, ref = vl
    requests = _requests(n_text_only=3, with_images=True)
    # 40 blocks of 4 tokens: every request fits alone, the batch does not -> preemption by recompute
    per_block = 2 * ref.config.text_config.num_hidden_layers * 4 * 2 * 16 * 4
    llm = _check_parity(path, ref, requests, max_tokens=12, kv_cache_gib=40 * per_block / 2**30,
                        max_num_batched_tokens=48)
    stats = llm.stats()
    assert stats.preemptions > 0
    assert stats.free_blocks == stats.num_blocks


def test_greedy_matches_transformers_for_text_model_with_qk_norm(text_qk):
    path, ref = text_qk
    llm = _check_parity(path, ref, _requests(n_text_only=6, with_images=False), max_tokens=10,
                        kv_cache_gib=0.001, max_num_batched_tokens=16)
    assert llm.stats().free_blocks == llm.stats().num_blocks


def test_prefix_cache_hits_and_changes_nothing(vl):
    path, _ = vl
    requests = [r for r, _, _ in _requests(n_text_only=2, with_images=True)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    off = LLM(path, block_size=4, kv_cache_gib=0.01, enable_prefix_caching=False).generate(requests, params)
    llm = LLM(path, block_size=4, kv_cache_gib=0.01)
    on = llm.generate(requests, params)
    assert llm.stats().prefix_cache_hit_tokens == 0
    again = llm.generate(requests, params)
    assert llm.stats().prefix_cache_hit_tokens > 0
    assert all(o.num_cached_tokens > 0 for o in again if len(o.prompt_token_ids) > 4)
    for a, b, c in zip(off, on, again):
        a, b, c = a.outputs[0], b.outputs[0], c.outputs[0]
        assert a.token_ids == b.token_ids == c.token_ids
        assert torch.allclose(torch.tensor(token_logprobs(a)), torch.tensor(token_logprobs(c)), atol=1e-5)


def test_equal_text_with_different_images_shares_no_image_block(vl):
    path, _ = vl
    llm = LLM(path, block_size=4, kv_cache_gib=0.01)
    ids = [5, 6, 7, 8, 9, 10, 11, 12, IMAGE_TOKEN, 13, 14, 15]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    a = {"prompt_token_ids": ids, "images": [random_image(56, 56, 1)]}
    b = {"prompt_token_ids": ids, "images": [random_image(56, 56, 2)]}
    llm.generate([a], params)
    hits = llm.stats().prefix_cache_hit_tokens
    out = llm.generate([b], params)[0]
    assert out.num_cached_tokens == 8 and llm.stats().prefix_cache_hit_tokens - hits == 8  # the two text blocks
    out = llm.generate([a], params)[0]
    assert out.num_cached_tokens > 8  # the same image is shared


def test_random_run_returns_every_block(vl):
    path, _ = vl
    llm = LLM(path, block_size=4, kv_cache_gib=0.00012, max_num_seqs=8, max_num_batched_tokens=32)
    rng = random.Random(0)
    stops = ["a", "e", "xyz", "\n"]
    submitted = []
    for i in range(60):
        ids = [rng.randrange(3, 250) for _ in range(rng.randrange(1, 30))]
        images = []
        if rng.random() < 0.3:
            ids.insert(rng.randrange(len(ids) + 1), IMAGE_TOKEN)
            images = [random_image(rng.randrange(20, 90), rng.randrange(20, 90), i)]
        params = SamplingParams(max_tokens=rng.randrange(1, 20), temperature=rng.choice([0, 0.7, 1.2]),
                                top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.9]), seed=i,
                                stop=[rng.choice(stops)] if rng.random() < 0.4 else [],
                                ignore_eos=rng.random() < 0.5)
        submitted.append(llm.add_request({"prompt_token_ids": ids, "images": images}, params))
    steps, finals = 0, {}
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                assert out.request_id not in finals  # reported finished exactly once
                finals[out.request_id] = out.outputs[0].finish_reason
        steps += 1
        if steps % 3 == 0:
            llm.abort(rng.choice(submitted))
    assert sorted(finals) == sorted(submitted)
    assert {"stop", "length", "abort"} == set(finals.values())
    engine = llm.engine
    stats = llm.stats()
    assert stats.preemptions > 0 and stats.free_blocks == stats.num_blocks and stats.requests == 0
    assert all(r == 0 for r in engine.blocks.ref)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.runner.image_embeds == {} and not engine.runner.encoded and not engine.runner.pending_drops


def first(out):
    return out.outputs[0]


def test_finish_reasons(vl, tmp_path):
    path, _ = vl
    llm = LLM(path, block_size=4, kv_cache_gib=0.01)
    req = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    free = first(llm.generate([req], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0])
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    third = free.token_ids[2]
    by_id = first(llm.generate([req], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                     stop_token_ids=[third]))[0])
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: free.token_ids.index(third) + 1]
    assert by_id.stop_reason == third
    text = free.text
    assert len(text) > 4
    stop = text[2:4]
    by_str = first(llm.generate([req], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))[0])
    assert by_str.finish_reason == "stop" and by_str.text == text[: text.index(stop)] and by_str.stop_reason == stop
    streamed = "".join(llm.stream(req, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])))
    assert streamed == by_str.text


def test_eos_ids_come_from_config_and_generation_config(vl, tmp_path):
    """The checkpoint's own lists: config.json's eos ids and generation_config.json's, both honoured."""
    import json
    import shutil

    path, ref = vl
    req = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    free = first(LLM(path, block_size=4, kv_cache_gib=0.01).generate(
        [req], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0])
    eos = free.token_ids[1]
    config_eos = ref.config.text_config.eos_token_id
    assert eos not in config_eos
    copy = shutil.copytree(path, tmp_path / "ckpt")
    gen = json.loads((copy / "generation_config.json").read_text())
    gen["eos_token_id"] = [eos]
    (copy / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(copy, block_size=4, kv_cache_gib=0.01)
    assert set(llm.engine.processor.eos_token_ids) == {eos, *config_eos}
    by_eos = first(llm.generate([req], SamplingParams(max_tokens=12, temperature=0))[0])
    assert by_eos.finish_reason == "stop" and by_eos.token_ids[-1] == eos and by_eos.stop_reason is None
    assert len(first(llm.generate([req], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]).token_ids) == 12


def test_request_that_can_never_fit_is_rejected_and_others_go_on(vl):
    path, _ = vl
    llm = LLM(path, block_size=4, kv_cache_gib=0.0002)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    huge = {"prompt_token_ids": list(range(3, 200)) * 3}
    outs = llm.generate([{"prompt_token_ids": [5, 6]}, huge, {"prompt_token_ids": [7, 8]}], params)
    assert outs[1].error and "exceeds the KV cache" in outs[1].error and first(outs[1]).finish_reason == "abort"
    assert len(first(outs[0]).token_ids) == 4 and len(first(outs[2]).token_ids) == 4
    with pytest.raises(Glm45vError, match="image placeholder"):
        llm.add_request({"prompt_token_ids": [5, IMAGE_TOKEN], "images": []}, params)


def test_prompt_plus_max_tokens_over_the_context_is_rejected(vl):
    path, ref = vl
    context = ref.config.text_config.max_position_embeddings
    llm = LLM(path, block_size=4, kv_cache_gib=0.01, max_model_len=64)
    with pytest.raises(Glm45vError, match=r"prompt \(5 tokens\) \+ max_tokens \(60\) exceeds the model's context of "
                                          r"64 tokens"):
        llm.add_request({"prompt_token_ids": [5, 6, 7, 8, 9]}, SamplingParams(max_tokens=60))
    out = first(llm.generate({"prompt_token_ids": [5, 6, 7, 8, 9]}, SamplingParams(max_tokens=59, temperature=0,
                                                                                     ignore_eos=True))[0])
    assert len(out.token_ids) == 59 and out.finish_reason == "length"
    unbounded = first(llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=None, temperature=0,
                                                                                 ignore_eos=True))[0])
    assert len(unbounded.token_ids) == 62  # max_tokens=None: until the context is full
    with pytest.raises(Glm45vError, match=f"max_model_len=99999: the model's context is {context} tokens"):
        LLM(path, max_model_len=99999)


def test_seeded_sampling_reproduces_across_batches(vl):
    path, _ = vl
    llm = LLM(path, block_size=4, kv_cache_gib=0.01)
    req = {"prompt_token_ids": [5, 6, 7, 8, 9, 10]}
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=5)
    alone = first(llm.generate([req], params)[0]).token_ids
    other = {"prompt_token_ids": [11, 12, 13]}
    crowded = first(llm.generate([other, req, other], [SamplingParams(max_tokens=7, temperature=1.0), params,
                                                       SamplingParams(max_tokens=3, temperature=0)])[1]).token_ids
    assert alone == crowded
    assert first(llm.generate([req], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=6))[0]).token_ids != alone


@pytest.fixture(scope="module")
def text_plain(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine-text-plain")
    return path, make_text_checkpoint(path, "no-qk-norm", seed=13)


@pytest.mark.parametrize("which", [pytest.param("vl", marks=pytest.mark.slow),
                                   pytest.param("text_qk", marks=pytest.mark.slow),
                                   pytest.param("text_plain", marks=pytest.mark.slow)])
def test_greedy_parity_with_fused_decode_kernels(request, triton_kernels, which):
    path, ref = request.getfixturevalue(which)
    requests = _requests(n_text_only=2, with_images=which == "vl")[:4]
    _check_parity(path, ref, requests, max_tokens=6, kv_cache_gib=0.001, max_num_batched_tokens=24)
    assert {"split_qkv_rmsnorm_rope", "store_kv", "paged_attention", "fused_moe"} <= set(triton_kernels)


def test_a_request_holding_every_slot_gives_one_up_to_the_next_request():
    """n = max_num_seqs admitted on an idle server takes every slot; the next request's sequence is admitted at the
    next step (the wide request's newest sequence is preempted), and the wide one keeps at least half the slots."""
    from glm45v_npu.engine.block_manager import BlockManager
    from glm45v_npu.engine.scheduler import Scheduler
    from glm45v_npu.engine.sequence import Sequence

    def seq(request):
        return Sequence([1, 2, 3], 3, SamplingParams(max_tokens=8), torch.zeros(3, 3), 0, request=request)

    sched = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=64)
    wide = [seq("wide") for _ in range(4)]
    for s in wide:
        sched.add(s)
    assert sched.schedule().seqs == wide
    for s in wide:
        s.num_computed = 3
        s.token_ids.append(5)
    late = seq("late")
    sched.add(late)
    batch = sched.schedule()
    assert late in batch.seqs and len(sched.running) == 4, batch.seqs
    assert sum(s.request == "wide" for s in sched.running) == 3 and wide[-1] in sched.waiting
    assert sched.preemptions == 1
