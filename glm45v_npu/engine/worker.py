"""One rank of a model replica: what it builds (its slice of the model, the runner and the KV cache, in lockstep
with the other ranks) and, on a follower, the loop that executes rank 0's step commands until told to stop.

Rank 0 runs the engine: it schedules, samples and serves the caller; parallel.Cluster starts the followers (or
torchrun does) with `worker_main`.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from typing import NoReturn

import torch

from .. import platform
from ..errors import Glm45vError
from ..model.glm4v_moe import build_model, dequantize, load_model
from ..model.hf_config import ModelConfig
from ..model.loader import init_dummy_weights
from ..model.quantization import QuantPlan
from ..parallel import layout as collectives
from ..parallel.cluster import KEEP_ALIVE
from ..parallel.layout import Layout
from .config import EngineConfig
from .memory import WarmupStep, kv_budget, kv_bytes_per_token
from .progress import ProgressBar
from .runner import ModelRunner


@dataclass
class RankSpec:
    """Everything a rank needs to build its part; pickled to worker processes."""

    config: EngineConfig
    path: str
    model: ModelConfig
    dtype: torch.dtype
    device: torch.device  # rank 0's device; rank r takes the r-th one after it
    world: int
    max_image_patches: int = 0  # the largest image the processor can produce, for the warm-up
    plan: QuantPlan | None = None  # which layers are 8-bit

    def layout(self, rank: int) -> Layout:
        return Layout(rank, self.world, self.config.enable_expert_parallel)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: `--device cuda:1` puts rank 0 on cuda:1 and rank 1 on cuda:2 (the CPU has one)."""
    if device.type == "cpu":
        return torch.device("cpu")
    return torch.device(device.type, (device.index or 0) + rank)


def build_rank(spec: RankSpec, layout: Layout, device: torch.device, progress: bool = False):
    """-> (model, runner, num_blocks, bytes per block). Every rank runs this in lockstep (the warm-up profile
    and the KV block count agreement are collectives)."""
    if spec.config.load_format == "dummy":
        model = build_model(spec.model, spec.dtype, device, layout, spec.plan)
        if model.plan.dequantize:
            dequantize(model, spec.dtype)
        init_dummy_weights(model, seed=spec.config.seed)
    else:
        model = load_model(spec.path, spec.model, spec.dtype, device,
                           progress=ProgressBar if progress else None, layout=layout, plan=spec.plan)
    block_size = spec.config.block_size
    per_block = kv_bytes_per_token(spec.model, layout, spec.dtype) * block_size
    budget = kv_budget(model, spec.config, WarmupStep.of(spec.config, spec.model, spec.max_image_patches), device)
    num_blocks = collectives.all_reduce_min(int(budget // per_block))
    if num_blocks < 2:
        raise Glm45vError(f"the KV cache budget ({budget / 2**30:.2f} GiB) holds fewer than 2 blocks of "
                          f"{block_size} tokens; raise kv_cache_gib or gpu_memory_utilization, or lower "
                          "max_num_batched_tokens or max_pixels (their warm-up peak comes first)")
    runner = ModelRunner(model, num_blocks, block_size, device, spec.dtype)
    if device.type != "cpu" and not spec.config.enforce_eager:
        max_len = spec.config.max_model_len or spec.model.text.max_position_embeddings
        runner.enable_decode_graphs(spec.config.max_num_seqs, max_len, capture=True)
    return model, runner, num_blocks, per_block


def worker_main(rank: int, spec: RankSpec, init_method: str) -> NoReturn:
    """A follower rank: build its part, then execute rank 0's step commands until told to stop."""
    layout = spec.layout(rank)
    device = rank_device(spec.device, rank)
    if device.type != "cpu":
        platform.device_module(device).set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
    code = 0
    try:
        collectives.init(layout, device, init_method, spec.config.dist_timeout_s)
        _, runner, _, _ = build_rank(spec, layout, device)
        while (command := collectives.broadcast(None)) is not None:
            if command != KEEP_ALIVE:
                runner.execute(command)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        code = 1
    finally:
        collectives.shutdown()
    sys.exit(code)
