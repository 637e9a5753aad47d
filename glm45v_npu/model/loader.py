"""safetensors shards -> model parameters.

The plan is built from the model side: every parameter lists the checkpoint tensors that fill it (fused qkv
from q/k/v, gate_up from gate and up, stacked experts from per-expert tensors). Loading then walks the shards
tensor by tensor (mmap), so host memory holds one tensor at a time, never the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import CheckpointError
from ..kernels.quant import quantize_weight
from .hf_config import ModelConfig
from .layers import SKIP, Piece

_IGNORED = re.compile(r"(rotary_emb\.inv_freq|self_attn\.[kv]_scale)$")  # stale buffers, FP8 KV-cache scales


def checkpoint_prefix(cfg: ModelConfig, ours: str) -> str:
    """A name in our model's scheme -> the checkpoint's name."""
    if ours.startswith("language_model."):
        head = "model.language_model." if cfg.is_multimodal else "model."
        return head + ours[len("language_model.") :]
    if ours.startswith("visual."):
        return "model." + ours
    return ours


def build_plan(model: nn.Module, cfg: ModelConfig) -> dict[str, Piece]:
    """checkpoint tensor name -> where it goes, and which slice of it this rank reads. Layers with a
    `checkpoint_plan` say it themselves (fused, stacked, sliced, flattened); every other parameter is one
    checkpoint tensor of its own name."""
    plan: dict[str, Piece] = {}
    declared: set[str] = set()
    for name, module in model.named_modules():
        if hasattr(module, "checkpoint_plan"):
            for source, piece in module.checkpoint_plan(name).items():
                plan[checkpoint_prefix(cfg, source)] = piece
                declared.update({piece.param, piece.scale_param})
    for name, _ in model.named_parameters():
        if name not in declared:
            plan[checkpoint_prefix(cfg, name)] = Piece(name)
    return plan


def shard_map(path: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from model.safetensors.index.json or a single model.safetensors (or, as other
    tools name them, the one *.safetensors.index.json or *.safetensors there: msmodelslim's
    quant_model_weight_w8a8.safetensors)."""
    index = path / "model.safetensors.index.json"
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if index.is_file() or len(indexes) == 1:
        return _shard_map_from(index if index.is_file() else indexes[0], path)
    single = path / "model.safetensors"
    shards = sorted(path.glob("*.safetensors"))
    if not single.is_file() and len(shards) == 1:
        single = shards[0]
    if single.is_file():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json (nor one *.safetensors "
                          "file or index of another name)")


def _shard_map_from(index: Path, path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
    files = {name: path / shard for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
        if not shard.is_file():
            raise CheckpointError(f"{index}: lists shard {shard.name}, which is missing from {path}")
    return files


@contextmanager
def _open(file: Path) -> Iterator:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def _skipped(name: str, cfg: ModelConfig) -> bool:
    """Layers past num_hidden_layers (GLM-4.5-Air's next-token-prediction layer) and stale rotary buffers."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    if m and not name.startswith("model.visual.") and int(m.group(1)) >= cfg.text.num_hidden_layers:
        return True
    return bool(_IGNORED.search(name))


def _normalise(name: str, cfg: ModelConfig) -> str:
    """Older VL checkpoints put the text model directly under `model.`."""
    if cfg.is_multimodal and name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + name[len("model.") :]
    return name


Progress = Callable[[str, int], Any]  # (description, total) -> a bar with advance() and stop(): the caller's style


def load_checkpoint(model: nn.Module, path: str | Path, progress: Progress | None = None) -> None:
    path = Path(path)
    cfg: ModelConfig = model.cfg
    plan = build_plan(model, cfg)
    params = dict(model.named_parameters())
    files = shard_map(path)
    tied = cfg.text.tie_word_embeddings
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)

    pending = {k: v for k, v in plan.items() if v.param is not None or v.zero}
    for name in {p.param for p in pending.values() if p.index or p.reduce == "max"}:
        params[name].data.zero_()  # filled in parts: what no part covers (vocab-parallel padding rows) stays 0
    for name in {p.param for p in pending.values() if p.reduce == "same"}:
        params[name].data.fill_(float("nan"))  # not yet seen
    model.bytes_read = 0
    total = len(files)
    bar = progress("loading weights", total) if progress else None
    with torch.no_grad():
        for file, names in by_file.items():
            with _open(file) as f:
                present = set(f.keys())
                for raw_name in names:
                    if raw_name not in present:
                        raise CheckpointError(f"{file}: the index lists tensor '{raw_name}' but the shard lacks it")
                    name = _normalise(raw_name, cfg)
                    if bar:
                        bar.advance()
                    if _skipped(name, cfg) or (tied and name == "lm_head.weight") or plan.get(name) is SKIP:
                        continue
                    piece = pending.pop(name, None)
                    if piece is None:
                        why = "appears twice" if name in plan else "is not part of this model"
                        raise CheckpointError(f"{file}: tensor '{raw_name}' {why} (config: {cfg.source})")
                    try:
                        tensor = f.get_slice(raw_name)[piece.src] if piece.src else f.get_tensor(raw_name)
                    except Exception as e:  # safetensors raises several types for a damaged payload
                        raise CheckpointError(f"{file}: cannot read tensor '{raw_name}' ({e})") from None
                    model.bytes_read += tensor.numel() * tensor.element_size()
                    _place(tensor, piece, params, f"{file}: tensor '{raw_name}'", cfg.source)
                    del tensor
    if bar:
        bar.stop()
    if pending:
        missing = sorted(pending)
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: checkpoint lacks tensor(s) {', '.join(missing[:5])}{more}")


def _place(tensor: torch.Tensor, piece: Piece, params: dict, where: str, source: str) -> None:
    """One checkpoint tensor into its parameter, as its piece says (see layers.Piece)."""
    if piece.zero:
        if tensor.count_nonzero():
            raise CheckpointError(f"{where}: non-zero weight offsets (asymmetric int8 weights) are not supported")
        return
    if piece.convert == "deq_scale" and tensor.dtype == torch.int64:  # float32 bits in the low 32 bits
        tensor = (tensor & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    target = params[piece.param].data[piece.index]
    if piece.quantize is not None:
        q, scale = quantize_weight(tensor.float(), piece.quantize)
        if q.shape != target.shape:
            raise CheckpointError(f"{where} has shape {list(tensor.shape)}, expected {list(target.shape)} ({source})")
        target.copy_(q.to(target.device))
        params[piece.scale_param].data[piece.index].copy_(scale.to(target.device))
        return
    if piece.expand > 1:  # block scales: each row of blocks covers `expand` rows here
        tensor = tensor.repeat_interleave(piece.expand, dim=0)[: target.shape[0]]
    if piece.broadcast or piece.reduce:
        if tensor.numel() != 1:
            raise CheckpointError(f"{where} has shape {list(tensor.shape)}, expected one value ({source})")
        value = tensor.reshape(()).to(device=target.device, dtype=target.dtype)
        if piece.reduce == "same" and not target.isnan().all() and not torch.equal(target, value.expand_as(target)):
            raise CheckpointError(f"{where}: the parts of this fused layer have different static input scales or "
                                  "offsets, which one quantized input cannot serve")
        target.copy_(torch.maximum(target, value) if piece.reduce == "max" else value.expand_as(target))
        return
    if piece.reshape and tensor.numel() == 1 < target.numel():  # a per-tensor scale given for a per-row one
        tensor = tensor.reshape(()).expand(target.shape)
    if tensor.shape != target.shape:
        if not (piece.reshape and tensor.numel() == target.numel() and tensor.shape[0] == target.shape[0]):
            raise CheckpointError(f"{where} has shape {list(tensor.shape)}, expected {list(target.shape)} from "
                                  f"{source}")
        tensor = tensor.reshape(target.shape)
    target.copy_(tensor.to(device=target.device, dtype=target.dtype))


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights from the config without reading any tensor (like vLLM's load_format='dummy'): small
    uniform values keep activations finite, norm weights are 1 and biases 0. Large matrices are tiled from one
    random block of prime length (no two rows alike), which is as fast as a memory copy; 8-bit weights take the
    same values through their scales (int8: integers scaled by 0.02/127). Where a tensor starts in the block
    depends on its name only, so every rank fills a tensor it shares with others (router, vision tower,
    replicated KV heads) identically."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    block = torch.empty(1_000_003, device=device).uniform_(-0.02, 0.02, generator=g)
    params = dict(model.named_parameters())
    int8_step = 0.02 / 127
    with torch.no_grad():
        for name, p in params.items():
            weight = params.get(name.removesuffix("_scale"))
            if name.endswith("weight_scale") or name.endswith(("w13_scale", "w2_scale")):
                p.fill_(int8_step if weight is not None and weight.dtype == torch.int8 else 1.0)
            elif name.endswith("input_scale"):
                p.fill_(int8_step)
            elif name.endswith(("bias", "input_offset")) and p.dim() == 1:
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                _tile(p.view(-1), block, seed, name, 1 / int8_step if p.dtype == torch.int8 else 1.0)


def _tile(flat: torch.Tensor, block: torch.Tensor, seed: int, name: str, scale: float) -> None:
    start = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % len(block)
    off = 0
    while off < flat.numel():
        n = min(len(block) - start, flat.numel() - off)
        piece = block[start : start + n]
        flat[off : off + n].copy_((piece * scale).round() if scale != 1.0 else piece)
        off, start = off + n, 0
