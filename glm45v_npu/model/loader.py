"""safetensors shards -> model parameters.

The plan is built from the model side: every parameter lists the checkpoint tensors that fill it (fused qkv
from q/k/v, gate_up from gate and up, stacked experts from per-expert tensors). Loading then walks the shards
tensor by tensor (mmap), so host memory holds one tensor at a time, never the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from ..progress import ProgressBar

# Checkpoint convolutions we hold as the equivalent linear layers: same numbers, flattened.
_FLATTENED = ("visual.patch_embed.proj.weight", "visual.downsample.weight")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Piece:
    param: str | None  # our parameter name; None = another rank's tensor, not read here
    index: tuple = ()  # where in the parameter the checkpoint tensor goes
    src: tuple = ()  # which part of the checkpoint tensor this rank reads
    reshape: bool = False


SKIP = Piece(None)


def checkpoint_prefix(cfg: ModelConfig, ours: str) -> str:
    """Our parameter name -> the checkpoint's name (before fusing)."""
    if ours.startswith("language_model."):
        head = "model.language_model." if cfg.is_multimodal else "model."
        return head + ours[len("language_model.") :]
    if ours.startswith("visual."):
        return "model." + ours
    return ours


def _rows(start: int, count: int) -> tuple:
    return (slice(start, start + count),)


def _cols(start: int, count: int) -> tuple:
    return (slice(None), slice(start, start + count))


def build_plan(model: nn.Module, cfg: ModelConfig) -> dict[str, Piece]:
    """checkpoint tensor name -> where it goes, and which slice of it this rank reads."""
    t, layout = cfg.text, model.layout
    rank_of = layout.rank
    plan: dict[str, Piece] = {}
    text_sharded = layout.world > 1
    for name, p in model.named_parameters():
        ck = checkpoint_prefix(cfg, name)
        base, _, leaf = ck.rpartition(".")
        sharded = text_sharded and not name.startswith("visual.")
        if base.endswith(".qkv_proj"):
            stem, hd = base[: -len("qkv_proj")], t.head_dim
            q0, nq = layout.even(t.num_attention_heads, "num_attention_heads", cfg.source)
            k0, nkv = layout.kv_heads(t.num_key_value_heads, cfg.source)
            q, kv = nq * hd, nkv * hd
            for proj, lo, size, first in (("q", 0, q, q0 * hd), ("k", q, kv, k0 * hd), ("v", q + kv, kv, k0 * hd)):
                plan[f"{stem}{proj}_proj.{leaf}"] = Piece(name, _rows(lo, size), _rows(first, size) if sharded else ())
        elif base.endswith(".o_proj"):
            plan[ck] = Piece(name, (), _cols(rank_of * p.shape[1], p.shape[1]) if sharded else ())
        elif base.endswith(".gate_up_proj"):
            stem, half = base[: -len("gate_up_proj")], p.shape[0] // 2
            src = _rows(rank_of * half, half) if sharded else ()
            plan[f"{stem}gate_proj.{leaf}"] = Piece(name, _rows(0, half), src)
            plan[f"{stem}up_proj.{leaf}"] = Piece(name, _rows(half, half), src)
        elif base.endswith(".down_proj") and sharded:
            plan[ck] = Piece(name, (), _cols(rank_of * p.shape[1], p.shape[1]))
        elif ck.endswith(".experts.w13"):
            stem, half, first = ck[: -len("w13")], p.shape[1] // 2, model_first_expert(model, name)
            src = _rows(rank_of * half, half) if (sharded and not layout.expert_parallel) else ()
            for e in range(t.n_routed_experts):
                local = e - first
                mine = 0 <= local < p.shape[0]
                plan[f"{stem}{e}.gate_proj.weight"] = Piece(name, (local, slice(0, half)), src) if mine else SKIP
                plan[f"{stem}{e}.up_proj.weight"] = Piece(name, (local, slice(half, 2 * half)), src) if mine else SKIP
        elif ck.endswith(".experts.w2"):
            stem, first = ck[: -len("w2")], model_first_expert(model, name)
            src = _cols(rank_of * p.shape[2], p.shape[2]) if (sharded and not layout.expert_parallel) else ()
            for e in range(t.n_routed_experts):
                local = e - first
                plan[f"{stem}{e}.down_proj.weight"] = Piece(name, (local,), src) if 0 <= local < p.shape[0] else SKIP
        elif sharded and (ck.endswith("embed_tokens.weight") or ck == "lm_head.weight"):
            start, rows = layout.vocab(t.vocab_size)
            real = max(0, min(rows, t.vocab_size - start))  # the last rank's padding rows stay zero
            plan[ck] = Piece(name, _rows(0, real), _rows(start, real))
        else:
            plan[ck] = Piece(name, (), reshape=name in _FLATTENED)
    return plan


def model_first_expert(model: nn.Module, param_name: str) -> int:
    return model.get_submodule(param_name.rpartition(".")[0]).first


def shard_map(path: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from model.safetensors.index.json or a single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{index}: lists shard {shard.name}, which is missing from {path}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


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


def load_checkpoint(model: nn.Module, path: str | Path, progress: bool = False) -> None:
    path = Path(path)
    cfg: ModelConfig = model.cfg
    plan = build_plan(model, cfg)
    params = dict(model.named_parameters())
    files = shard_map(path)
    tied = cfg.text.tie_word_embeddings
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)

    pending = {k: v for k, v in plan.items() if v.param is not None}
    padded = [p for n, p in params.items() if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    for p in padded:
        p.data.zero_()  # vocab-parallel padding rows beyond the vocabulary
    model.bytes_read = 0
    total = len(files)
    bar = ProgressBar("loading weights", total) if progress else None
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
                    target = params[piece.param].data[piece.index]
                    if tensor.shape != target.shape:
                        if not (piece.reshape and tensor.numel() == target.numel() and tensor.shape[0] == target.shape[0]):
                            raise CheckpointError(
                                f"{file}: tensor '{raw_name}' has shape {list(tensor.shape)}, "
                                f"expected {list(target.shape)} from {cfg.source}"
                            )
                        tensor = tensor.reshape(target.shape)
                    target.copy_(tensor.to(device=target.device, dtype=target.dtype))
                    del tensor
    if bar:
        bar.stop()
    if pending:
        missing = sorted(pending)
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: checkpoint lacks tensor(s) {', '.join(missing[:5])}{more}")



def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights from the config without reading any tensor (like vLLM's load_format='dummy'): small
    uniform values keep activations finite, norm weights are 1 and biases 0. Large matrices are tiled from one
    random block of prime length (no two rows alike), which is as fast as a memory copy. Where a tensor starts in
    the block depends on its name only, so every rank fills a tensor it shares with others (router, vision tower,
    replicated KV heads) identically."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    block = torch.empty(1_000_003, device=device).uniform_(-0.02, 0.02, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.dim() == 1:
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                flat = p.view(-1)
                start = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % len(block)
                off = 0
                while off < flat.numel():
                    n = min(len(block) - start, flat.numel() - off)
                    flat[off : off + n].copy_(block[start : start + n])
                    off, start = off + n, 0
