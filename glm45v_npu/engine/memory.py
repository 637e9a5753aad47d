"""The memory plan of one rank: its weight bytes (counted on the meta device), KV bytes per token, whether the
weights fit, and the KV-cache budget: what the device has left after the weights and the peak of a warm-up step.
`glm45v info` prints the same accounting the engine uses."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import platform
from ..errors import Glm45vError
from ..model.glm4v_moe import build_model, dequantize
from ..model.hf_config import ModelConfig
from ..model.quantization import QuantPlan
from ..parallel.layout import Layout
from ..sampling_params import SamplingParams
from .config import EngineConfig
from .graph import DecodeGraphs, buckets_for
from .runner import ModelRunner, StepInputs, allocate_kv_cache, drop_kv_cache
from .sampler import Sampler

log = logging.getLogger("glm45v_npu")
CPU_KV_BYTES = 2**28  # 256 MiB on a CPU unless kv_cache_gib says otherwise


@dataclass(frozen=True)
class WarmupStep:
    """The largest step a rank will run, which the KV budget leaves room for: a prefill of `tokens` tokens (its
    last `rows` sampled), and the vision tower on the largest image the processor can make; and the decode graphs
    it will capture (`graph_buckets`, none with enforce_eager; `graph_width`: block-table columns per row)."""

    tokens: int
    rows: int
    block_size: int
    image_grid: tuple[int, int, int] | None = None
    patch_dim: int = 0
    graph_buckets: tuple[int, ...] = ()
    graph_width: int = 1

    @classmethod
    def of(cls, config: EngineConfig, model: ModelConfig, max_image_patches: int) -> WarmupStep:
        tokens = min(config.max_num_batched_tokens, model.text.max_position_embeddings)
        grid = None
        if max_image_patches and model.vision is not None:
            grid = warmup_image_grid(max_image_patches, model.vision.spatial_merge_size)
        max_len = config.max_model_len or model.text.max_position_embeddings
        return cls(tokens, min(config.max_num_seqs, tokens), config.block_size, grid,
                   model.vision.patch_dim if model.vision is not None else 0,
                   () if config.enforce_eager else buckets_for(config.max_num_seqs), -(-max_len // config.block_size))


def kv_budget(model, config: EngineConfig, warmup: WarmupStep, device: torch.device) -> float:
    """Bytes for the KV cache: kv_cache_gib when given, 256 MiB on a CPU, else what the accelerator has left."""
    if config.kv_cache_gib is not None:
        log.info("KV cache: %.2f GiB, as kv_cache_gib says", config.kv_cache_gib)
        return config.kv_cache_gib * 2**30
    if device.type == "cpu":
        log.info("KV cache: %.2f GiB, the default on a CPU (set kv_cache_gib for more)", CPU_KV_BYTES / 2**30)
        return CPU_KV_BYTES
    return accelerator_kv_budget(model, config, warmup, device)


def accelerator_kv_budget(model, config: EngineConfig, warmup: WarmupStep, device: torch.device) -> float:
    """The usable share of the device, minus what is in use once the weights are loaded (this process and any
    other), minus the peak of a warm-up step that holds the largest prefill, the largest image and the sampler
    over the largest batch. Logged line by line."""
    activations = profile_peak(model, warmup, device)
    graphs = decode_graph_bytes(model, warmup, device)
    free, total = platform.memory_info(device)
    usable = total * config.gpu_memory_utilization
    in_use = total - free
    budget = usable - in_use - activations - graphs.total
    gib = 2**30
    patches = warmup.image_grid[1] * warmup.image_grid[2] if warmup.image_grid else 0
    log.info("KV cache budget on %s:\n"
             "  %8.2f GiB device memory\n"
             "  %8.2f GiB usable (gpu_memory_utilization %.2f)\n"
             "- %8.2f GiB in use after loading (%.2f GiB of it this rank's weights)\n"
             "- %8.2f GiB warm-up peak (%d-token prefill, %d-patch image, sampler over %d rows)\n"
             "- %8.2f GiB decode graphs (%s)\n"
             "= %8.2f GiB for the KV cache",
             device, total / gib, usable / gib, config.gpu_memory_utilization, in_use / gib,
             platform.allocated_memory(device) / gib, activations / gib, warmup.tokens, patches, warmup.rows,
             graphs.total / gib, graphs.describe(), budget / gib)
    return budget


@dataclass(frozen=True)
class GraphBytes:
    """What the decode graphs will hold: their static inputs, the pool of their capture (the largest bucket's
    step peak: every smaller bucket's capture reuses its blocks) and every bucket's logits (kept for replay)."""

    buckets: tuple[int, ...] = ()
    static: int = 0
    step_peak: int = 0
    logits: int = 0

    @property
    def total(self) -> int:
        return self.static + self.step_peak + self.logits

    def describe(self) -> str:
        if not self.buckets:
            return "none: eager decode"
        gib = 2**30
        return (f"{len(self.buckets)} buckets up to {self.buckets[-1]}: {self.static / gib:.2f} static inputs, "
                f"{self.step_peak / gib:.2f} step peak, {self.logits / gib:.2f} logits")


@torch.inference_mode()
def decode_graph_bytes(model, warmup: WarmupStep, device: torch.device) -> GraphBytes:
    """Counted before the KV cache is sized (a capture that finds the device full fails): the static inputs from
    their shapes, the step's peak from a dry run of the largest bucket on the static buffers with a throw-away
    cache of one block per row, measured above what is held (where a device exists: the CPU has no graphs)."""
    if not warmup.graph_buckets:
        return GraphBytes()
    n, bs = warmup.graph_buckets[-1], warmup.block_size
    static = sum(t.numel() * t.element_size() for t in
                 DecodeGraphs(model, n, warmup.graph_width, bs, torch.device("meta"), capture=False).buffers().values())
    allocate_kv_cache(model, n + 1, bs, device, next(model.language_model.parameters()).dtype)
    dry = DecodeGraphs(model, n, 1, bs, device, capture=False)
    dry.load([0] * n, torch.zeros(3, n, dtype=torch.long), [1] * n, [[1 + i] for i in range(n)])
    platform.synchronize(device)
    base = platform.allocated_memory(device)
    platform.reset_peak_memory(device)
    out = dry.forward(n)
    platform.synchronize(device)
    peak = max(platform.peak_memory(device) - base, 0)
    row = out.shape[-1] * out.element_size()
    del dry, out
    drop_kv_cache(model)
    return GraphBytes(warmup.graph_buckets, static, peak, (sum(warmup.graph_buckets) - n) * row)


def warmup_image_grid(patches: int, merge: int) -> tuple[int, int, int]:
    """A square-ish grid of at most `patches` patches, each side a multiple of the merge size."""
    side = max(merge, int(math.isqrt(max(patches, 1))) // merge * merge)
    return 1, side, side


@torch.inference_mode()
def profile_peak(model, warmup: WarmupStep, device: torch.device) -> int:
    """Device bytes above the weights at the peak of the largest step: the vision tower on the largest image,
    a prefill of max_num_batched_tokens tokens through a throw-away cache just big enough for it, and the
    sampler over max_num_seqs rows. It runs through the runner, the same path as every step."""
    n, bs, rows = warmup.tokens, warmup.block_size, warmup.rows
    blocks = -(-n // bs)
    runner = ModelRunner(model, blocks, bs, device, next(model.language_model.parameters()).dtype)
    platform.synchronize(device)
    base = platform.allocated_memory(device)
    platform.reset_peak_memory(device)
    encode = []
    if warmup.image_grid is not None:
        _, h, w = warmup.image_grid
        encode = [(-1, [torch.zeros(h * w, warmup.patch_dim)], [warmup.image_grid])]
    inputs = StepInputs([0] * n, torch.arange(n).expand(3, -1), [n], [n], [list(range(blocks))],
                        list(range(n - rows, n)), encode=encode, drop_images=[-1])
    logits = runner.execute(inputs)
    params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50, logprobs=5)] * rows
    Sampler()(logits, params, [None] * rows, [[]] * rows)
    platform.synchronize(device)
    peak = platform.peak_memory(device) - base
    drop_kv_cache(model)
    return max(peak, 0)


def weight_bytes_per_rank(cfg: ModelConfig, layout: Layout, dtype: torch.dtype, plan: QuantPlan | None = None
                          ) -> int:
    """Bytes of one rank's weights as they will be held (8-bit where the plan says, dequantized where it holds
    FP8 as floats), counted on the meta device (nothing allocated)."""
    model = build_model(cfg, dtype, "meta", layout, plan)
    if model.plan.dequantize:
        dequantize(model, dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


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
               fraction: float, plan: QuantPlan | None = None, ranks_here: int | None = None) -> int:
    """Refuse up front, with the numbers, when one rank's weights cannot fit its device (on a CPU, when the
    weights of the ranks on this machine, `ranks_here`, cannot fit its memory). Returns the per-rank bytes."""
    per_rank = weight_bytes_per_rank(cfg, layout, dtype, plan)
    here = layout.world if ranks_here is None else ranks_here
    if device.type == "cpu":
        need, have, where = per_rank * here, available_bytes(device), "available host memory"
    else:
        need, have, where = per_rank, int(available_bytes(device) * fraction), f"{fraction:.0%} of one {device.type}"
    if need > have:
        raise Glm45vError(
            f"the weights do not fit: {here if device.type == 'cpu' else 1} rank(s) x {per_rank / 2**30:.1f} GiB "
            f"({str(dtype).removeprefix('torch.')}) need {need / 2**30:.1f} GiB but {where} is {have / 2**30:.1f} GiB;"
            " use more devices (--tensor-parallel-size) or --num-layers for a truncated benchmark")
    return per_rank
