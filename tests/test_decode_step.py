"""The decode step a device graph captures, proven on the CPU (tests/step_probe.py): no host sync anywhere in it,
at batch buckets 1, 8 and 64, every layer (MoE included), on the CUDA path (the Triton kernels, under Triton's
interpreter) and on the NPU path (torch_npu's ops through a stand-in); a sync put back into the MoE path is caught;
and the launches of one step are counted per layer."""

import pytest
import torch

from glm45v_npu.kernels import fused_moe, ops
from tests.step_probe import (
    count_launches,
    decode_step,
    glm45v_small,
    kernels_are_device_work,
    no_host_syncs_allowed,
)


@pytest.fixture()
def triton_path(monkeypatch):
    monkeypatch.setenv("GLM45V_KERNELS", "triton")
    monkeypatch.setattr(ops, "_cache", {})


def _probed(graphs, bucket: int, *vendor) -> list:
    """Warm up first (as capture does: compiles, the NPU ops' first-call self-checks), then the probed step."""
    with torch.inference_mode():
        want = graphs.forward(bucket).clone()
        with kernels_are_device_work(*vendor), no_host_syncs_allowed() as syncs:
            got = graphs.forward(bucket)
    assert torch.equal(got, want)  # the same step twice: nothing in it depends on the first
    return syncs


@pytest.mark.parametrize("bucket", [1, pytest.param(8, marks=pytest.mark.slow),
                                    pytest.param(64, marks=pytest.mark.slow)])  # the interpreter is slow
def test_the_cuda_decode_step_never_waits_for_the_device(triton_path, bucket):
    graphs = decode_step(glm45v_small(), bucket)
    assert _probed(graphs, bucket) == []


@pytest.mark.parametrize("bucket", [1, 8, 64])
def test_the_npu_decode_step_never_waits_for_the_device(npu_everywhere, fake, bucket):
    graphs = decode_step(glm45v_small(), bucket)
    assert _probed(graphs, bucket, fake) == []
    assert {"npu_moe_init_routing_v2", "npu_moe_gating_top_k", "npu_rms_norm", "_npu_reshape_and_cache"} <= set(
        fake.calls)
    assert all(getattr(w, "verified", None) is not False for w in npu_everywhere.values())  # nothing gave up


def test_the_probe_catches_a_sync_put_back_into_the_moe_path(triton_path, monkeypatch):
    """An `.item()` in the expert alignment (a plausible 'skip empty experts' shortcut) is reported where it is."""
    real = fused_moe.align_by_expert

    def with_a_sync(topk_ids, num_experts, block_m):
        if int(topk_ids.max().item()) < 0:
            raise AssertionError("never")
        return real(topk_ids, num_experts, block_m)

    monkeypatch.setattr(fused_moe, "align_by_expert", with_a_sync)
    graphs = decode_step(glm45v_small(), 2)
    syncs = _probed(graphs, 2)
    moe_layers = sum(layer.is_moe for layer in graphs.model.language_model.layers)
    assert len(syncs) == moe_layers and {why for why, _ in syncs} == {"item()"}
    assert all(where.startswith("test_decode_step.py:") for _, where in syncs), syncs


@pytest.mark.slow
@pytest.mark.parametrize("use_qk_norm", [False, True], ids=["glm-4.5v", "qk-norm"])
def test_launches_per_layer_are_counted(triton_path, use_qk_norm):
    """A dense layer and each MoE layer launch the same number of kernels at any batch; the count is printed (the
    README's figures come from benchmarks/decode_launches.py, which runs the same counter)."""
    counts = {}
    for bucket in (1, 8):
        graphs = decode_step(glm45v_small(use_qk_norm=use_qk_norm), bucket)
        with torch.inference_mode(), count_launches(graphs.model) as counter:
            graphs.forward(bucket)
        counts[bucket] = dict(counter.by_layer)
    assert counts[1] == counts[8]
    per = counts[1]
    assert per[1] == per[2] > per[0] > 0 and per["outside layers"] > 0
    print(f"\nlaunches per decode step ({'qk norm' if use_qk_norm else 'GLM-4.5V'} structure): dense layer {per[0]}, "
          f"MoE layer {per[1]}, outside the layers {per['outside layers']}")
