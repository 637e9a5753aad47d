"""Tensor and expert parallel over torch.distributed, on the CPU with gloo and real worker processes."""

import os
import re
import signal
import time

import pytest
import torch
from safetensors import safe_open

from glm45v_npu import LLM, SamplingParams
from glm45v_npu.errors import Glm45vError
from glm45v_npu.model.glm4v_moe import load_model
from glm45v_npu.model.hf_config import load_config
from glm45v_npu.parallel.layout import Layout
from tests.harness import spy_on_reads
from tests.tiny import IMAGE_TOKEN, make_vl_checkpoint, random_image


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp")
    make_vl_checkpoint(path, "gqa2-hd32-half-rope", seed=21, max_shard_size="60KB")
    return path


def _requests():
    return [
        {"prompt_token_ids": [5, 6, 7, 8, 9, 10, 11]},
        {"prompt_token_ids": [12, IMAGE_TOKEN, 13, 14], "images": [random_image(60, 90, 1)]},
        {"prompt_token_ids": [15, IMAGE_TOKEN, 16, IMAGE_TOKEN, 17],
         "images": [random_image(40, 120, 2), random_image(20, 30, 3)]},
    ]


PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def single(ckpt):
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.002)
    return llm.generate(_requests(), PARAMS)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("expert_parallel", [True, False], ids=["expert-parallel", "tensor-parallel-experts"])
def test_matches_single_process(ckpt, single, world, expert_parallel):
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.002, tensor_parallel_size=world,
              enable_expert_parallel=expert_parallel, dist_timeout_s=60)
    workers = llm.engine.cluster.workers
    try:
        assert len(workers) == world - 1
        outs = llm.generate(_requests(), PARAMS)
    finally:
        llm.close()
    for a, b in zip(single, outs):
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids == b.token_ids
        assert max(abs(x[t].logprob - y[t].logprob) for x, y, t in zip(a.logprobs, b.logprobs, a.token_ids)) <= 2e-3
    assert all(not p.is_alive() for p in workers)


def test_head_count_not_dividing_is_a_clear_error(ckpt):
    with pytest.raises(Glm45vError, match=r"num_attention_heads \(4\) is not divisible by --tensor-parallel-size 3"):
        LLM(ckpt, tensor_parallel_size=3)


def test_weights_that_cannot_fit_are_refused_up_front():
    with pytest.raises(Glm45vError, match=r"the weights do not fit: 2 rank\(s\) x .* GiB"):
        LLM("glm-4.5v", load_format="dummy", dtype="bfloat16", tensor_parallel_size=2)


def test_each_rank_reads_only_its_slices_once(ckpt, monkeypatch):
    reads: dict[int, list[str]] = {}
    rank = [0]

    def on_read(name, read):
        reads.setdefault(rank[0], []).append(name)
        return read()

    spy_on_reads(monkeypatch, on_read)
    cfg = load_config(ckpt)
    read_bytes = []
    for r in (0, 1):
        rank[0] = r
        model = load_model(ckpt, cfg, torch.float32, "cpu", layout=Layout(r, 2))
        read_bytes.append(model.bytes_read)
        assert len(reads[r]) == len(set(reads[r]))  # each tensor read at most once per rank
    total = replicated = 0
    shared = re.compile(r"^model\.visual\.|layernorm|\.norm\.weight$|mlp\.gate\.")
    for shard in ckpt.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                nbytes = 4 * int(torch.tensor(t.get_shape()).prod())
                total += nbytes
                replicated += nbytes if shared.search(name) else 0
    assert len(list(ckpt.glob("*.safetensors"))) >= 3
    assert sum(read_bytes) == total + replicated  # sharded tensors read once in all, replicated ones per rank
    assert max(read_bytes) < total


def test_dead_worker_ends_the_run_naming_the_rank(ckpt):
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.002, tensor_parallel_size=2, dist_timeout_s=20)
    llm.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=500, ignore_eos=True))
    llm.step()
    os.kill(llm.engine.cluster.workers[0].pid, signal.SIGKILL)
    start = time.time()
    with pytest.raises(Glm45vError, match=r"rank 1 died"):
        while llm.has_unfinished():
            llm.step()
    assert time.time() - start < 30
    with pytest.raises(Glm45vError, match="rank 1 died"):
        llm.step()
