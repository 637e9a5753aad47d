"""One rank of a model replica: what it builds (its slice of the model, the runner and the KV cache, in lockstep
with the other ranks) and, on a follower, the loop that executes rank 0's step commands until told to stop.

Rank 0 runs the engine: it schedules, samples and serves the caller; parallel.Cluster starts the followers (or
torchrun does) with `worker_main`.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from .. import platform
from ..errors import Glm45vError
from ..inputs.processor import Processor
from ..kernels import ops
from ..model.glm4v_moe import build_model, dequantize, load_model
from ..model.hf_config import ModelConfig, check_layout, load_config, with_num_layers
from ..model.hub import resolve_model
from ..model.loader import init_dummy_weights
from ..model.quantization import QuantPlan, read_plan
from ..parallel import layout as collectives
from ..parallel.cluster import KEEP_ALIVE, Torchrun, leave, register
from ..parallel.layout import Layout
from .config import EngineConfig
from .memory import WarmupStep, check_fits, kv_budget, kv_bytes_per_token
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


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """A rank's device on its own machine: `--device cuda:1` puts local rank 0 on cuda:1 and local rank 1 on
    cuda:2 (the CPU has one). Under torchrun the local rank is LOCAL_RANK, not the global rank."""
    if device.type == "cpu":
        return torch.device("cpu")
    return torch.device(device.type, (device.index or 0) + local_rank)


@dataclass
class Prepared:
    """What a rank works out from its EngineConfig before any process group exists."""

    spec: RankSpec
    layout: Layout
    torchrun: Torchrun | None
    device: torch.device
    path: Path
    processor: Processor
    max_model_len: int
    weight_bytes: int


def prepare(config: EngineConfig) -> Prepared:
    """The model, layout, device and checks of this rank: every rank runs it (the CLI's followers before any
    command work), so a mistake is one error on every rank and no rank waits for one that never joins."""
    path, weightless = resolve_model(config.model, config.revision, config.download_dir)
    if weightless and config.load_format != "dummy":
        raise Glm45vError(f"--model {config.model}: a built-in config has no weights; add --load-format dummy")
    cfg = with_num_layers(load_config(path), config.num_layers)
    torchrun = Torchrun.from_env()
    if torchrun is not None:
        torchrun.check(config.tensor_parallel_size)
    world = config.tensor_parallel_size
    layout = Layout(torchrun.rank if torchrun else 0, world, config.enable_expert_parallel)
    check_layout(cfg, layout)  # a clear error before any process starts
    base = platform.pick_device(config.device)
    device = rank_device(base, torchrun.local_rank if torchrun else 0)
    dtype = platform.pick_dtype(config.dtype, device)
    limit = cfg.text.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > limit:
        raise Glm45vError(f"max_model_len={config.max_model_len}: the model's context is {limit} tokens "
                          f"(max_position_embeddings in {cfg.source})")
    plan = read_plan(path, config.quantization, device.type)
    here = torchrun.local_world if torchrun else world  # ranks sharing this machine's memory and cores
    weight_bytes = check_fits(cfg, layout, dtype, device, config.gpu_memory_utilization, plan, here)
    processor = Processor(path, cfg, config.max_pixels, config.limit_mm_per_prompt, config.mm_processor_kwargs)
    spec = RankSpec(config, str(path), cfg, dtype, base, world, processor.max_image_patches, plan)
    return Prepared(spec, layout, torchrun, device, path, processor, config.max_model_len or limit, weight_bytes)


def follow(config: EngineConfig) -> NoReturn:
    """A follower under torchrun, before any command work: its part of the model, then rank 0's steps."""
    ready = prepare(config)
    worker_main(ready.layout.rank, ready.spec, "env://")


def build_rank(spec: RankSpec, layout: Layout, device: torch.device, progress: bool = False):
    """-> (model, runner, num_blocks, bytes per block). Every rank runs this in lockstep (the warm-up profile
    and the KV block count agreement are collectives)."""
    ops.prepare(device)
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
    torchrun = Torchrun.from_env()
    device = rank_device(spec.device, torchrun.local_rank if torchrun else rank)
    if device.type != "cpu":
        platform.device_module(device).set_device(device)
    if device.type == "cpu":
        platform.use_cpu_share(torchrun.local_rank if torchrun else rank,
                               torchrun.local_world if torchrun else spec.world)
    code, joined = 0, False
    try:
        collectives.init(layout, device, init_method, spec.config.dist_timeout_s)
        register(rank, torchrun.node if torchrun else 0)
        _, runner, _, _ = build_rank(spec, layout, device)
        joined = True
        while (command := collectives.broadcast(None)) is not None:
            if command != KEEP_ALIVE:
                runner.execute(command)
    except Exception as e:  # rank 0 gone or silent past the timeout, or this rank's own failure
        if joined and collectives.is_comm_error(e):
            print(f"glm45v rank {rank}: lost rank 0 or heard nothing from it for {spec.config.dist_timeout_s:.0f} s "
                  f"({type(e).__name__}); exiting", file=sys.stderr)
        else:
            traceback.print_exc(file=sys.stderr)
        code = 1
    finally:
        leave()
    sys.exit(code)
