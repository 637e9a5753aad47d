"""Loading the real on-disk layout: shards, fusing, skipped layers, and a clear error for each bad checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm45v_npu.errors import CheckpointError
from glm45v_npu.model.glm4v_moe import load_model
from glm45v_npu.model.hf_config import load_config
from tests.harness import PagedRunner, build_prompt, reference_logits, rel_err, spy_on_reads
from tests.tiny import make_text_checkpoint, make_vl_checkpoint


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    ref = make_vl_checkpoint(path, "gqa3-hd16-full-rope", seed=3, max_shard_size="60KB")
    return path, ref


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _shards(path):
    return sorted(path.glob("model-*.safetensors"))


def _load(path):
    return load_model(path, load_config(path), torch.float32, "cpu")


def test_sharded_checkpoint_loads_and_matches(sharded):
    path, ref = sharded
    assert len(_shards(path)) >= 3
    model = _load(path)
    ids = build_prompt([11], [], seed=0)
    ours, _ = PagedRunner(model).prefill(ids)
    assert rel_err(ours, reference_logits(ref, ids)) <= 1e-4


def test_fused_and_stacked_parameters_hold_checkpoint_tensors(sharded):
    path, _ = sharded
    model = _load(path)
    tensors = {}
    for shard in _shards(path):
        tensors.update(load_file(shard))
    layer = "model.language_model.layers.2"
    qkv = model.language_model.layers[2].self_attn.qkv_proj.weight
    expected = torch.cat([tensors[f"{layer}.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, expected)
    w13 = model.language_model.layers[2].mlp.experts.w13
    assert torch.equal(w13[4], torch.cat([tensors[f"{layer}.mlp.experts.4.gate_proj.weight"],
                                          tensors[f"{layer}.mlp.experts.4.up_proj.weight"]]))
    assert torch.equal(model.language_model.layers[2].mlp.experts.w2[5], tensors[f"{layer}.mlp.experts.5.down_proj.weight"])


def _edit_shard(path, fn):
    """Rewrite the shard holding tensors of layer 1, through `fn(dict) -> dict`; returns that shard's name."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = index["weight_map"]["model.language_model.layers.1.self_attn.k_proj.weight"]
    tensors = load_file(path / name)
    save_file(fn(tensors), path / name, metadata={"format": "pt"})
    return name


def test_missing_tensor_is_named(sharded, tmp_path):
    path = _copy(sharded[0], tmp_path / "ck")
    key = "model.language_model.layers.1.self_attn.k_proj.weight"
    _edit_shard(path, lambda t: {k: v for k, v in t.items() if k != key})
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"lacks tensor.*{key}"):
        _load(path)


def test_unexpected_tensor_is_named(sharded, tmp_path):
    path = _copy(sharded[0], tmp_path / "ck")
    key = "model.language_model.layers.1.self_attn.mystery.weight"
    shard = _edit_shard(path, lambda t: {**t, key: torch.zeros(3)})
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"][key] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{shard}: tensor '{key}' is not part of this model"):
        _load(path)


def test_shape_mismatch_is_named(sharded, tmp_path):
    path = _copy(sharded[0], tmp_path / "ck")
    key = "model.language_model.layers.1.self_attn.k_proj.weight"
    shard = _edit_shard(path, lambda t: {**t, key: torch.zeros(5, 7)})
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor '{key}' has shape \[5, 7\], expected"):
        _load(path)


def test_truncated_shard_is_named(sharded, tmp_path):
    path = _copy(sharded[0], tmp_path / "ck")
    shard = _shards(path)[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name}: corrupt or truncated"):
        _load(path)


def test_corrupt_header_is_named(sharded, tmp_path):
    path = _copy(sharded[0], tmp_path / "ck")
    shard = _shards(path)[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header}" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=f"{shard.name}: corrupt or truncated"):
        _load(path)


def test_missing_shard_file_is_named(sharded, tmp_path):
    path = _copy(sharded[0], tmp_path / "ck")
    shard = _shards(path)[2]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {shard.name}, which is missing"):
        _load(path)


def test_no_weights_at_all(tmp_path, sharded):
    shutil.copy(sharded[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        _load(tmp_path)


def test_next_token_prediction_layer_is_skipped(tmp_path):
    """GLM-4.5-Air carries an MTP layer at index num_hidden_layers; it must not load nor count as unexpected."""
    ref = make_text_checkpoint(tmp_path, "no-qk-norm")
    tensors = load_file(tmp_path / "model.safetensors")
    n = ref.config.num_hidden_layers
    extra = {f"model.layers.{n}.eh_proj.weight": torch.zeros(4, 8), f"model.layers.{n}.enorm.weight": torch.ones(4),
             f"model.layers.{n}.mlp.experts.0.gate_proj.weight": torch.zeros(2, 2)}
    save_file({**tensors, **extra}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = _load(tmp_path)
    ids = build_prompt([9], [], seed=1)
    ours, _ = PagedRunner(model).prefill(ids)
    assert rel_err(ours, reference_logits(ref, ids)) <= 1e-4


def test_low_precision_load_keeps_router_fp32(sharded):
    path, _ = sharded
    model = load_model(path, load_config(path), torch.bfloat16, "cpu")
    mlp = model.language_model.layers[2].mlp
    assert mlp.gate.weight.dtype == torch.float32 and mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert mlp.experts.w13.dtype == torch.bfloat16
    assert model.visual.blocks[0].attn.qkv.weight.dtype == torch.bfloat16


@pytest.mark.slow
def test_loader_holds_one_checkpoint_tensor_at_a_time(sharded, monkeypatch):
    """Host memory during a load stays bounded: each tensor read is released before the next one is read. (A full
    collection runs only when an earlier read is still alive: one per read took a minute in a process holding the
    slow tier's imports.)"""
    import gc
    import weakref

    alive, reads = [], []

    def on_read(name, read):
        if any(ref() is not None for ref in reads):
            gc.collect()  # a tensor kept alive only by a reference cycle is released here, not counted
        alive.append(sum(ref() is not None for ref in reads))
        t = read()
        reads.append(weakref.ref(t))
        return t

    spy_on_reads(monkeypatch, on_read)
    _load(sharded[0])
    assert len(reads) > 50 and max(alive) == 0
