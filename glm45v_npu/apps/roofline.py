"""Decode step time against its memory-bandwidth floor, and against transformers on the same config.

Real GLM-4.5V shapes with dummy weights and N decoder layers. The floor is the bytes one decode step must read
(attention, the dense MLP, shared experts, routers, lm_head, the expected number of distinct routed experts for
the batch, and the KV cache) over the device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import time

import torch

from .. import platform
from ..engine.runner import ModelRunner, StepInputs, drop_kv_cache
from ..kernels import ops
from ..model.glm4v_moe import build_model, dequantize
from ..model.hf_config import ModelConfig, load_config, with_num_layers
from ..model.hub import resolve_model
from ..model.loader import init_dummy_weights
from ..model.quantization import read_plan


def copy_bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    if device.type == "cpu":
        nbytes = 2**27
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    platform.synchronize(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        platform.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def step_bytes(cfg: ModelConfig, batch: int, context: int, itemsize: int = 2, weight_itemsize: int | None = None,
               distinct: float | None = None) -> dict[str, float]:
    """weight_itemsize: bytes per weight of the decoder's linear and expert layers (1 for FP8 / int8; their
    scales are a fraction of a percent and not counted); lm_head, routers and the KV cache keep their own.
    distinct: routed experts a MoE layer reads per step, as measured (default: what uniform routing of `batch`
    tokens would hit)."""
    t = cfg.text
    h, layers = t.hidden_size, t.num_hidden_layers
    w = itemsize if weight_itemsize is None else weight_itemsize
    attn = (h * (t.q_size + 2 * t.kv_size) + t.q_size * h) * w
    dense_layers = min(t.first_k_dense_replace, layers)
    moe_layers = layers - dense_layers
    expert = 3 * h * t.moe_intermediate_size * w
    E, K = t.n_routed_experts, t.num_experts_per_tok
    if distinct is None:
        distinct = E * (1 - (1 - K / E) ** batch)  # expected distinct experts hit by `batch` tokens
    parts = {
        "attention": layers * attn,
        "dense mlp": dense_layers * 3 * h * t.intermediate_size * w,
        "shared experts": moe_layers * t.n_shared_experts * expert,
        "routers": moe_layers * E * h * 4,
        "routed experts": moe_layers * distinct * expert,
        "lm_head": t.vocab_size * h * itemsize,
        "kv cache": batch * context * layers * 2 * t.kv_size * itemsize,
    }
    parts["total"] = sum(parts.values())
    return parts


@torch.inference_mode()
def our_step_time(model, cfg: ModelConfig, batch: int, context: int, device: torch.device, steps: int = 20,
                  block_size: int = 16, graphs: bool = False) -> float:
    """One decode step of `batch` sequences at `context` tokens, through the runner (the path every engine step
    takes: step inputs from host lists, embed, layers, logits; with `graphs`, the captured decode graph of the
    batch's bucket), median of `steps`."""
    blocks_per_seq = -(-(context + 1) // block_size)
    runner = ModelRunner(model, batch * blocks_per_seq + 1, block_size, device, next(model.parameters()).dtype)
    if graphs:
        runner.enable_decode_graphs(batch, blocks_per_seq * block_size, capture=device.type != "cpu")
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    ids = torch.randint(0, cfg.text.vocab_size, (batch,)).tolist()
    inputs = StepInputs(ids, torch.full((3, batch), context), [1] * batch, [context + 1] * batch, tables,
                        list(range(batch)))

    def step():
        runner.execute(inputs).argmax(-1)

    times = _timed(step, device, steps, warmup=3)
    drop_kv_cache(model)
    return times


def _timed(fn, device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds of fn over `steps` calls, each synchronised."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        platform.synchronize(device)
        t = time.perf_counter()
        fn()
        platform.synchronize(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def transformers_step_time(cfg_path, num_layers: int, batch: int, context: int, device: torch.device,
                           dtype: torch.dtype, steps: int = 16) -> float:
    """transformers' decode step on the same config and layer count: the prompt is prefilled once, then the
    median of `steps` one-token forwards over that cache (cut back to the prompt after each), so prefill and
    generate's bookkeeping stay out of the figure."""
    from transformers import AutoConfig, Glm4vMoeForConditionalGeneration

    config = AutoConfig.from_pretrained(cfg_path)
    config.text_config.num_hidden_layers = num_layers
    for c in (config, config.text_config, config.vision_config):
        c.dtype = dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Glm4vMoeForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    high = min(config.text_config.vocab_size, config.image_start_token_id)
    ids = torch.randint(0, high, (batch, context), device=device)
    zeros = torch.zeros_like(ids, dtype=torch.int)
    out = model(input_ids=ids, mm_token_type_ids=zeros, use_cache=True)
    cache = out.past_key_values
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    position = torch.full((3, batch, 1), context, device=device)

    def step():
        model(input_ids=token, past_key_values=cache, position_ids=position,
              mm_token_type_ids=torch.zeros_like(token, dtype=torch.int), use_cache=True).logits.argmax(-1)
        cache.crop(-1)  # drop the token just added: every step decodes at the same context

    return _timed(step, device, steps, warmup=2)


def roofline(model: str = "glm-4.5v", num_layers: int = 4, batches: tuple[int, ...] = (1, 32), context: int = 512,
             device: str | None = None, dtype: str | None = "bfloat16", compare_transformers: bool = True,
             graphs: tuple[bool, ...] = (False, True), quantization: str = "auto") -> dict:
    """quantization "fp8": the decoder's weights in FP8 (the floor counts them at one byte)."""
    dev = platform.pick_device(device)
    dt = platform.pick_dtype(dtype, dev)
    path = resolve_model(model)[0]
    cfg = with_num_layers(load_config(path), num_layers)
    plan = read_plan(path, quantization, dev.type)
    ours = build_model(cfg, dt, dev, plan=plan)
    if plan.dequantize:
        dequantize(ours, dt)
    init_dummy_weights(ours)
    weight_itemsize = 1 if plan.active and not plan.dequantize else None
    bandwidth = copy_bandwidth(dev)
    rows = []
    for batch in batches:
        for graph in graphs:
            step = our_step_time(ours, cfg, batch, context, dev, graphs=graph)
            floor_bytes = step_bytes(cfg, batch, context, dt.itemsize, weight_itemsize)["total"]
            rows.append({"batch": batch, "graphs": graph, "step_s": step, "floor_bytes": floor_bytes,
                         "floor_s": floor_bytes / bandwidth, "ratio_to_floor": step / (floor_bytes / bandwidth)})
    del ours
    if dev.type != "cpu":
        platform.device_module(dev).empty_cache()
    if compare_transformers:
        hf = {b: transformers_step_time(path, num_layers, b, context, dev, dt) for b in batches}
        for row in rows:
            row["transformers_step_s"] = hf[row["batch"]]
            row["speedup_vs_transformers"] = hf[row["batch"]] / row["step_s"]
    return {"model": model, "num_layers": num_layers, "context": context, "device": str(dev),
            "quantization": plan.describe(),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
            "dtype": str(dt).removeprefix("torch."), "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows,
            "kernels": ops.describe(dev)}


def table(result: dict):
    from rich.table import Table

    t = Table(title=f"decode roofline: {result['model']}, {result['num_layers']} layers, context {result['context']},"
              f" {result['device_name']} {result['dtype']}, copy bandwidth "
              f"{result['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s")
    for col in ("batch", "graphs", "step", "floor", "step / floor", "transformers step", "speed-up"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        hf = r.get("transformers_step_s")
        t.add_row(str(r["batch"]), "on" if r.get("graphs") else "off", f"{r['step_s'] * 1e3:.2f} ms", f"{r['floor_s'] * 1e3:.2f} ms",
                  f"{r['ratio_to_floor']:.2f}x", f"{hf * 1e3:.1f} ms" if hf else "-",
                  f"{r['speedup_vs_transformers']:.1f}x" if hf else "-")
    return t
