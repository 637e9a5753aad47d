"""One model replica split over N ranks: building each rank's part, the worker loop, the memory plan.

Rank 0 is the LLM: it schedules, samples and serves the CLI. Ranks 1..N-1 are worker processes it starts (or
torchrun starts); each builds its slice of the model, then executes the StepInputs rank 0 broadcasts each step.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed, platform
from .config import ModelConfig
from .context import ForwardContext
from .distributed import Layout
from .engine.runner import ModelRunner, allocate_kv_cache, release_kv_cache
from .errors import Glm45vError


@dataclass
class RankSpec:
    """Everything a rank needs to build its part; pickled to worker processes."""

    path: str
    cfg: ModelConfig
    dtype: torch.dtype
    device_type: str
    load_format: str
    block_size: int
    kv_cache_gib: float | None
    memory_fraction: float
    max_num_batched_tokens: int
    world: int
    expert_parallel: bool
    init_method: str = ""
    timeout_s: float = 120.0


def rank_device(device_type: str, rank: int) -> torch.device:
    return torch.device("cpu") if device_type == "cpu" else torch.device(device_type, rank)


def build_rank(spec: RankSpec, layout: Layout, device: torch.device, progress: bool = False):
    """-> (model, runner, num_blocks, bytes per block). Every rank runs this in lockstep (the warm-up profile
    and the KV block count agreement are collectives)."""
    from .model.glm4v_moe import build_model, load_model
    from .model.loader import init_dummy_weights

    if spec.load_format == "dummy":
        model = build_model(spec.cfg, spec.dtype, device, layout)
        init_dummy_weights(model, seed=layout.rank)
    else:
        model = load_model(spec.path, spec.cfg, spec.dtype, device, progress=progress, layout=layout)
    per_block = kv_bytes_per_token(spec.cfg, layout, spec.dtype) * spec.block_size
    if spec.kv_cache_gib is not None:
        budget = spec.kv_cache_gib * 2**30
    elif device.type == "cpu":
        budget = 2**28  # 256 MiB: plenty for small models; pass kv_cache_gib for more
    else:
        budget = platform.total_memory(device) * spec.memory_fraction - profile_peak(model, spec, device)
    num_blocks = distributed.all_reduce_min(int(budget // per_block))
    if num_blocks < 2:
        raise Glm45vError(f"KV cache budget {budget / 2**30:.2f} GiB holds fewer than 2 blocks; raise kv_cache_gib "
                          "or memory_fraction")
    return model, ModelRunner(model, num_blocks, spec.block_size, device, spec.dtype), num_blocks, per_block


@torch.inference_mode()
def profile_peak(model, spec: RankSpec, device: torch.device) -> int:
    """Device bytes at the peak of the largest step (weights + activations): one prefill of
    max_num_batched_tokens tokens through a throw-away cache just big enough for it."""
    n = min(spec.max_num_batched_tokens, spec.cfg.text.max_position_embeddings)
    blocks = -(-n // spec.block_size)
    allocate_kv_cache(model, blocks, spec.block_size, device, spec.dtype)
    platform.reset_peak_memory(device)
    ctx = ForwardContext.build([n], [n], [list(range(blocks))], spec.block_size, device)
    embeds = model.embed(torch.zeros(n, dtype=torch.long, device=device))
    positions = torch.arange(n, device=device).expand(3, -1)
    model.logits(model(embeds, positions, ctx)[-1:])
    platform.synchronize(device)
    peak = platform.peak_memory(device)
    release_kv_cache(model)
    return peak


def worker_main(rank: int, spec: RankSpec) -> None:
    """A follower rank: build its part, then execute rank 0's step commands until told to stop."""
    layout = Layout(rank, spec.world, spec.expert_parallel)
    device = rank_device(spec.device_type, rank)
    if device.type != "cpu":
        platform.device_module(device).set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
    code = 0
    try:
        distributed.init(layout, device, spec.init_method, spec.timeout_s)
        _, runner, _, _ = build_rank(spec, layout, device)
        while (inputs := distributed.broadcast(None)) is not None:
            runner.execute(inputs)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        code = 1
    finally:
        distributed.shutdown()
    sys.exit(code)


def spawn_workers(spec: RankSpec) -> list[multiprocessing.Process]:
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for rank in range(1, spec.world):
        p = ctx.Process(target=worker_main, args=(rank, spec), name=f"glm45v-rank{rank}", daemon=True)
        p.start()
        procs.append(p)
    return procs


def weight_bytes_per_rank(cfg: ModelConfig, layout: Layout, dtype: torch.dtype) -> int:
    """Bytes of one rank's weights, counted on the meta device (nothing allocated)."""
    from .model.glm4v_moe import build_model

    return sum(p.numel() * p.element_size() for p in build_model(cfg, dtype, "meta", layout).parameters())


def kv_bytes_per_token(cfg: ModelConfig, layout: Layout, dtype: torch.dtype) -> int:
    t = cfg.text
    _, kv = layout.kv_heads(t.num_key_value_heads, cfg.source)
    return 2 * t.num_hidden_layers * kv * t.head_dim * dtype.itemsize


def available_bytes(device: torch.device) -> int:
    if device.type != "cpu":
        return platform.total_memory(device)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def check_fits(cfg: ModelConfig, layout: Layout, dtype: torch.dtype, device: torch.device,
               fraction: float) -> int:
    """Refuse up front, with the numbers, when one rank's weights cannot fit its device (on a CPU, when all
    ranks' weights cannot fit the host memory). Returns the per-rank weight bytes."""
    per_rank = weight_bytes_per_rank(cfg, layout, dtype)
    if device.type == "cpu":
        need, have, where = per_rank * layout.world, available_bytes(device), "available host memory"
    else:
        need, have, where = per_rank, int(available_bytes(device) * fraction), f"{fraction:.0%} of one {device.type}"
    if need > have:
        raise Glm45vError(
            f"the weights do not fit: {layout.world} rank(s) x {per_rank / 2**30:.1f} GiB "
            f"({str(dtype).removeprefix('torch.')}) need {need / 2**30:.1f} GiB but {where} is {have / 2**30:.1f} GiB;"
            " use more devices (--tensor-parallel-size) or --num-layers for a truncated benchmark")
    return per_rank
