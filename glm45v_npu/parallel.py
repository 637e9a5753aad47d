"""One model replica split over N ranks: building each rank's part, the KV budget, the worker loop, and rank
0's supervision of the others (`Cluster`).

Rank 0 runs the engine: it schedules, samples and serves the caller. Ranks 1..N-1 are worker processes it starts
(or torchrun starts); each builds its slice of the model, then executes the StepInputs rank 0 broadcasts each step.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import sys
import time
import traceback
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from . import distributed, platform
from .config import ModelConfig
from .distributed import Layout
from .engine.config import EngineConfig
from .engine.runner import ModelRunner, StepInputs, release_kv_cache
from .errors import Glm45vError

log = logging.getLogger("glm45v_npu")
CPU_KV_BYTES = 2**28  # 256 MiB on a CPU unless kv_cache_gib says otherwise


@dataclass
class RankSpec:
    """Everything a rank needs to build its part; pickled to worker processes."""

    config: EngineConfig
    path: str
    model: ModelConfig
    dtype: torch.dtype
    device_type: str
    world: int
    max_image_patches: int = 0  # the largest image the processor can produce, for the warm-up
    init_method: str = ""

    def layout(self, rank: int) -> Layout:
        return Layout(rank, self.world, self.config.enable_expert_parallel)


def rank_device(device_type: str, rank: int) -> torch.device:
    return torch.device("cpu") if device_type == "cpu" else torch.device(device_type, rank)


def build_rank(spec: RankSpec, layout: Layout, device: torch.device, progress: bool = False):
    """-> (model, runner, num_blocks, bytes per block). Every rank runs this in lockstep (the warm-up profile
    and the KV block count agreement are collectives)."""
    from .model.glm4v_moe import build_model, load_model
    from .model.loader import init_dummy_weights

    if spec.config.load_format == "dummy":
        model = build_model(spec.model, spec.dtype, device, layout)
        init_dummy_weights(model, seed=spec.config.seed)
    else:
        model = load_model(spec.path, spec.model, spec.dtype, device, progress=progress, layout=layout)
    block_size = spec.config.block_size
    per_block = kv_bytes_per_token(spec.model, layout, spec.dtype) * block_size
    budget = kv_budget(model, spec, device)
    num_blocks = distributed.all_reduce_min(int(budget // per_block))
    if num_blocks < 2:
        raise Glm45vError(f"the KV cache budget ({budget / 2**30:.2f} GiB) holds fewer than 2 blocks of "
                          f"{block_size} tokens; raise kv_cache_gib or gpu_memory_utilization, or lower "
                          "max_num_batched_tokens or max_pixels (their warm-up peak comes first)")
    runner = ModelRunner(model, num_blocks, block_size, device, spec.dtype)
    if device.type != "cpu" and not spec.config.enforce_eager:
        max_len = spec.config.max_model_len or spec.model.text.max_position_embeddings
        runner.enable_decode_graphs(spec.config.max_num_seqs, max_len, capture=True)
    return model, runner, num_blocks, per_block


def kv_budget(model, spec: RankSpec, device: torch.device) -> float:
    """Bytes for the KV cache: kv_cache_gib when given, 256 MiB on a CPU, else what the accelerator has left."""
    cfg = spec.config
    if cfg.kv_cache_gib is not None:
        log.info("KV cache: %.2f GiB, as kv_cache_gib says", cfg.kv_cache_gib)
        return cfg.kv_cache_gib * 2**30
    if device.type == "cpu":
        log.info("KV cache: %.2f GiB, the default on a CPU (set kv_cache_gib for more)", CPU_KV_BYTES / 2**30)
        return CPU_KV_BYTES
    return accelerator_kv_budget(model, spec, device)


def accelerator_kv_budget(model, spec: RankSpec, device: torch.device) -> float:
    """The usable share of the device, minus what is in use once the weights are loaded (this process and any
    other), minus the peak of a warm-up step that holds the largest prefill, the largest image and the sampler
    over the largest batch. Logged line by line."""
    cfg = spec.config
    activations = profile_peak(model, spec, device)
    free, total = platform.memory_info(device)
    usable = total * cfg.gpu_memory_utilization
    in_use = total - free
    budget = usable - in_use - activations
    gib = 2**30
    log.info("KV cache budget on %s:\n"
             "  %8.2f GiB device memory\n"
             "  %8.2f GiB usable (gpu_memory_utilization %.2f)\n"
             "- %8.2f GiB in use after loading (%.2f GiB of it this rank's weights)\n"
             "- %8.2f GiB warm-up peak (%d-token prefill, %d-patch image, sampler over %d rows)\n"
             "= %8.2f GiB for the KV cache",
             device, total / gib, usable / gib, cfg.gpu_memory_utilization, in_use / gib,
             platform.allocated_memory(device) / gib, activations / gib, warmup_tokens(spec),
             spec.max_image_patches, min(cfg.max_num_seqs, warmup_tokens(spec)), budget / gib)
    return budget


def warmup_tokens(spec: RankSpec) -> int:
    return min(spec.config.max_num_batched_tokens, spec.model.text.max_position_embeddings)


def warmup_image_grid(patches: int, merge: int) -> tuple[int, int, int]:
    """A square-ish grid of at most `patches` patches, each side a multiple of the merge size."""
    side = max(merge, int(math.isqrt(max(patches, 1))) // merge * merge)
    return 1, side, side


@torch.inference_mode()
def profile_peak(model, spec: RankSpec, device: torch.device) -> int:
    """Device bytes above the weights at the peak of the largest step: the vision tower on the largest image,
    a prefill of max_num_batched_tokens tokens through a throw-away cache just big enough for it, and the
    sampler over max_num_seqs rows. It runs through the runner, the same path as every step."""
    from .sampling import Sampler, SamplingParams

    n, bs = warmup_tokens(spec), spec.config.block_size
    blocks = -(-n // bs)
    runner = ModelRunner(model, blocks, bs, device, spec.dtype)
    platform.synchronize(device)
    base = platform.allocated_memory(device)
    platform.reset_peak_memory(device)
    rows = min(spec.config.max_num_seqs, n)
    encode = []
    if spec.max_image_patches and spec.model.vision is not None:
        grid = warmup_image_grid(spec.max_image_patches, spec.model.vision.spatial_merge_size)
        pixels = torch.zeros(grid[1] * grid[2], spec.model.vision.patch_dim)
        encode = [(-1, [pixels], [grid])]
    inputs = StepInputs([0] * n, torch.arange(n).expand(3, -1), [n], [n], [list(range(blocks))],
                        list(range(n - rows, n)), encode=encode, release=[-1])
    logits = runner.execute(inputs)
    params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50, logprobs=5)] * rows
    Sampler()(logits, params, [None] * rows, [[]] * rows)
    platform.synchronize(device)
    peak = platform.peak_memory(device) - base
    release_kv_cache(model)
    return max(peak, 0)


def worker_main(rank: int, spec: RankSpec) -> NoReturn:
    """A follower rank: build its part, then execute rank 0's step commands until told to stop."""
    layout = spec.layout(rank)
    device = rank_device(spec.device_type, rank)
    if device.type != "cpu":
        platform.device_module(device).set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
    code = 0
    try:
        distributed.init(layout, device, spec.init_method, spec.config.dist_timeout_s)
        _, runner, _, _ = build_rank(spec, layout, device)
        while (inputs := distributed.broadcast(None)) is not None:
            runner.execute(inputs)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        code = 1
    finally:
        distributed.shutdown()
    sys.exit(code)


class Cluster:
    """Rank 0's side of a replica over several ranks: starts the other ranks (unless torchrun did), sends each
    step to them, and turns a rank's death or a failed collective into one error that names the rank."""

    def __init__(self, spec: RankSpec, layout: Layout, device: torch.device, torchrun: bool):
        self.world, self.workers, self.broken = layout.world, [], None
        self._finalizer = None
        if self.world == 1:
            return
        spec.init_method = "env://" if torchrun else f"tcp://127.0.0.1:{distributed.free_port()}"
        if torchrun and layout.rank > 0:  # torchrun started this process as a follower: serve, then exit
            worker_main(layout.rank, spec)
        if not torchrun:
            ctx = multiprocessing.get_context("spawn")
            for rank in range(1, spec.world):
                p = ctx.Process(target=worker_main, args=(rank, spec), name=f"glm45v-rank{rank}", daemon=True)
                p.start()
                self.workers.append(p)
        self._finalizer = weakref.finalize(self, _shutdown, self.workers)
        with self.collective():
            if device.type != "cpu":
                platform.device_module(device).set_device(device)
            distributed.init(layout, device, spec.init_method, spec.config.dist_timeout_s)

    @contextmanager
    def collective(self) -> Iterator[None]:
        """Work that the other ranks take part in: on several ranks any failure in it ends the run."""
        if self.broken:
            raise Glm45vError(self.broken)
        try:
            yield
        except Glm45vError:
            raise
        except Exception as e:
            if self.world > 1:
                self.fail(e)
            raise

    def send(self, inputs: StepInputs) -> None:
        if self.world > 1:
            if any(p.exitcode is not None for p in self.workers):
                raise RuntimeError("a worker exited")
            distributed.broadcast(inputs)

    def fail(self, error: Exception) -> NoReturn:
        """A collective failed: name the rank that died (if one did) instead of a raw backend error."""
        for _ in range(50):  # give a dying worker a moment to be reaped, so its exit code is known
            if any(p.exitcode is not None for p in self.workers):
                break
            time.sleep(0.1)
        dead = [(i + 1, p.exitcode) for i, p in enumerate(self.workers) if p.exitcode is not None]
        for p in self.workers:
            if p.is_alive():
                p.kill()
        self.broken = (
            f"tensor-parallel rank {dead[0][0]} died (exit code {dead[0][1]}); the run cannot go on" if dead
            else f"a tensor-parallel collective failed ({type(error).__name__}: {error}); the run cannot go on"
        )
        if self._finalizer is not None:
            self._finalizer.detach()
        distributed.shutdown()
        raise Glm45vError(self.broken) from None

    def close(self) -> None:
        """Stop the worker ranks and leave the process group."""
        if self._finalizer is not None and self.broken is None:
            self._finalizer()


def _shutdown(workers: list) -> None:
    try:
        distributed.broadcast(None)
    except Exception:  # a worker already gone: nothing to tell it
        pass
    for p in workers:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    distributed.shutdown()


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
