"""Everything issue "Decode at the memory limit" asks to measure, in one run on one accelerator:

    python benchmarks/gpu_check.py [--layers 4] [--json out.json]     (CUDA or NPU; --quick for a CPU smoke run)

1. kernel correctness: `pytest tests/test_kernels.py` compiled on the device (run it before this script);
2. the decode roofline at batch 1, 8, 32, 64 with decode graphs off and on, against the byte floor (copy
   bandwidth measured in the same run) and transformers' decode step on the same config; the same with the
   decoder in FP8 (--quantization fp8: the floor counts its weights at one byte);
3. end to end: `glm45v bench`'s workload (dummy weights, --num-layers, 512 in / 256 out) at batch 1 and 32, its
   inter-token latency p50 against the roofline step with graphs;
4. prefill: 8 prompts x 2048 tokens, tokens/s and achieved TFLOP/s as a share of a bf16 matmul measured here;
5. the vision tower on one 1120x1120 image, ours against transformers' tower on the same weights;
6. Triton compiles during 300 decode steps of growing context (should be 0 after warm-up).
Targets (4 layers, H100/H200, bf16, context 512): step <= 2.0x the floor at batch 1 and <= 1.5x at batch 32,
end-to-end ITL <= 1.15x the roofline step, prefill >= 45% of the matmul rate, vision <= 0.6x transformers' time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from glm45v_npu import platform
from glm45v_npu.apps.roofline import _timed, roofline


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _timed(lambda: a @ b, device, steps=10, warmup=3)
    return 2 * n**3 / seconds / 1e12


def prefill_rate(model_name: str, layers: int, device: str, dtype: str, prompts: int, length: int) -> dict:
    from glm45v_npu import LLM, SamplingParams

    llm = LLM(model_name, load_format="dummy", num_layers=layers, device=device, dtype=dtype,
              max_num_batched_tokens=prompts * length, max_num_seqs=prompts, enforce_eager=True)
    cfg = llm.model_config.text
    requests = [{"prompt_token_ids": [(7 * i + j) % 30000 + 10 for j in range(length)]} for i in range(prompts)]
    params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)
    llm.generate(requests[:1], params)
    platform.synchronize(llm.device)
    start = time.perf_counter()
    llm.generate(requests, params)
    platform.synchronize(llm.device)
    seconds = time.perf_counter() - start
    tokens = prompts * length
    active = 2 * (cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size
                  + 3 * cfg.hidden_size * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts))
    flops = tokens * active * cfg.num_hidden_layers + 2 * tokens * length * cfg.q_size * cfg.num_hidden_layers
    llm.close()
    return {"tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12}


def vision_times(device: torch.device, dtype: torch.dtype, side: int) -> dict:
    """Our vision tower and transformers' on GLM-4.5V's vision shapes and one side x side image (random weights:
    the time does not depend on their values)."""
    from PIL import Image
    from transformers import AutoConfig, Glm4vMoeForConditionalGeneration

    from glm45v_npu.inputs.processor import image_processor_class
    from glm45v_npu.model.hf_config import builtin_config, load_config
    from glm45v_npu.model.vision import VisionTower

    config = AutoConfig.from_pretrained(builtin_config("glm-4.5v").parent)
    config.text_config.num_hidden_layers = 1
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ref = Glm4vMoeForConditionalGeneration(config).eval().model.visual
            ours = VisionTower(load_config(builtin_config("glm-4.5v")).vision).eval()
            for p in ours.parameters():
                torch.nn.init.normal_(p, std=0.02)
    finally:
        torch.set_default_dtype(previous)
    ip = image_processor_class()(size={"shortest_edge": 112 * 112, "longest_edge": side * side})
    image = Image.fromarray(torch.randint(0, 255, (side, side, 3), dtype=torch.uint8).numpy())
    px = ip(images=[image], return_tensors="pt")
    pixels, grid = px["pixel_values"].to(device, dtype), px["image_grid_thw"].to(device)
    with torch.inference_mode():
        theirs = _timed(lambda: ref(pixels, grid_thw=grid), device, steps=5, warmup=2)
        mine = _timed(lambda: ours(pixels, [tuple(int(v) for v in grid[0])]), device, steps=5, warmup=2)
    return {"side": side, "ours_s": mine, "transformers_s": theirs, "ratio": mine / theirs}


def end_to_end(layers: int, device: str | None, dtype: str, batch: int, input_len: int, output_len: int) -> dict:
    """glm45v bench's workload with dummy weights: inter-token latency and per-step host/device times."""
    from glm45v_npu import LLM
    from glm45v_npu.apps.bench import run_bench

    llm = LLM("glm-4.5v", load_format="dummy", num_layers=layers, device=device, dtype=dtype, max_num_seqs=batch)
    result = run_bench(llm, batch, input_len, output_len, 0, (448, 448))
    llm.close()
    return {k: result[k] for k in ("itl_p50_s", "itl_p99_s", "ttft_p50_s", "decode_tokens_per_s", "host_s_per_step",
                                   "device_s_per_step", "steps")}


def compiled_variants() -> dict[str, int]:
    """Triton specialisations compiled so far, per kernel of the project (none run after warm-up, ideally)."""
    from glm45v_npu.kernels import fused_moe, kv_cache, paged_attention, router, split_qkv_rmsnorm_rope

    out = {}
    for module in (fused_moe, kv_cache, paged_attention, router, split_qkv_rmsnorm_rope):
        for name in dir(module):
            fn = getattr(module, name)
            caches = getattr(fn, "device_caches", None)
            if isinstance(caches, dict):
                out[name] = sum(len(entry[0]) for entry in caches.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run on a CPU")
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = platform.pick_device(a.device)
    dtype = "float32" if dev.type == "cpu" else "bfloat16"
    batches = (1, 4) if a.quick else (1, 8, 32, 64)
    context = 64 if a.quick else 512
    layers = 1 if a.quick else a.layers
    result = {"device": str(dev), "dtype": dtype, "layers": layers}
    result["roofline"] = roofline("glm-4.5v", layers, batches, context, a.device, dtype)
    result["roofline_fp8"] = roofline("glm-4.5v", layers, batches, context, a.device, dtype,
                                      compare_transformers=False, quantization="fp8")
    result["matmul_tflops"] = matmul_tflops(dev, platform.pick_dtype(dtype, dev), 1024 if a.quick else 8192)
    result["prefill"] = prefill_rate("glm-4.5v", layers, a.device, dtype, 2 if a.quick else 8, 64 if a.quick else 2048)
    result["prefill"]["share_of_matmul"] = result["prefill"]["tflops"] / result["matmul_tflops"]
    lengths = (16, 8) if a.quick else (512, 256)
    result["end_to_end"] = {}
    for batch in batches[:: len(batches) - 1] if len(batches) > 1 else batches:
        compiled_before = compiled_variants()
        e2e = end_to_end(layers, a.device, dtype, batch, *lengths)
        step = next(r["step_s"] for r in result["roofline"]["rows"] if r["batch"] == batch and r.get("graphs"))
        e2e["itl_over_roofline_step"] = e2e["itl_p50_s"] / step
        e2e["new_compiles"] = {k: v - compiled_before.get(k, 0) for k, v in compiled_variants().items()
                               if v != compiled_before.get(k, 0)}
        result["end_to_end"][batch] = e2e
    result["vision"] = vision_times(dev, platform.pick_dtype(dtype, dev), 112 if a.quick else 1120)
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
