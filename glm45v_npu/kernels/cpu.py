"""The CPU's own kernels (cpu_kernels.cpp): decode-size matmuls that read each weight once in its stored type
(bf16, fp16, fp32, FP8, int8 with their scales), the routed experts in two calls per layer, and decode attention
read straight from the paged cache.

They are compiled once per machine, when the first engine starts (`ops.prepare`; torch's C++ extension builder,
`-march=native`, ninja), into `$GLM45V_KERNEL_CACHE` (default: the glm45v-npu cache folder's `kernels/`), keyed
by the source, torch and the CPU's instruction sets. Without a C++ compiler the twins serve, with one warning. Each function here has a twin's
signature and hands calls it does not serve (prefill-size batches, schemes it does not read) to that twin; ops.py
wraps them in a first-call self-check against the twin, as with the NPU's fast ops.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform as host
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..platform import cache_dir
from .fused_moe import fused_moe_torch, synced_scales
from .metadata import AttentionMetadata
from .paged_attention import paged_attention_torch
from .quant import FP8, GROUP, QuantSpec, expand, quant_linear_torch, quantize_torch

log = logging.getLogger("glm45v_npu")
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]

# Batches up to which the native matmuls serve: with AMX tiles they read float weights at the floor up to 32 rows
# (oneDNN's own blocked kernels take over beyond, for prefill); with AVX-512 dot products up to 4. 8-bit weights
# have no oneDNN path: the native kernels serve them at every size.
MOE_PAIRS = 256  # (token, expert) pairs up to which float experts run natively (8-bit ones always do)


def cache_folder() -> Path:
    return Path(os.environ.get("GLM45V_KERNEL_CACHE") or cache_dir() / "kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return host.processor()


def build_name() -> str:
    key = "\n".join([SOURCE.read_text(), torch.__version__, host.machine(), " ".join(FLAGS), _cpu_flags()])
    return "glm45v_cpu_" + hashlib.sha256(key.encode()).hexdigest()[:16]


@cache
def available() -> bool:
    """Build (once per machine) and load the kernels; False, with one warning, where that is not possible."""
    if hasattr(torch.ops, "glm45v_cpu") and hasattr(torch.ops.glm45v_cpu, "linear"):
        return True
    name = build_name()
    folder = cache_folder() / name
    built = folder / f"{name}.so"
    try:
        if built.is_file():
            torch.ops.load_library(str(built))
            return True
        from torch.utils.cpp_extension import load

        folder.mkdir(parents=True, exist_ok=True)
        log.warning("compiling the CPU kernels for this machine (once, about 10 s) into %s", folder)
        start = time.perf_counter()
        load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
             build_directory=str(folder), is_python_module=False, verbose=False)
        log.info("CPU kernels built in %.1f s", time.perf_counter() - start)
        return True
    except Exception as e:  # no compiler, no ninja, an unsupported CPU: the twins serve
        log.warning("the CPU kernels could not be built (%s: %s); the portable torch path serves, several "
                    "times slower at decode", type(e).__name__, str(e).strip().splitlines()[-1][:300] if str(e)
                    else "")
        return False


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


@cache
def caps() -> int:
    """1: bf16 dot products (AVX-512 BF16); 2: AMX tiles, permitted by the OS."""
    return int(torch.ops.glm45v_cpu.caps())


def float_rows() -> int:
    return 32 if caps() & 2 else 4


def _operands(x: torch.Tensor, weight: torch.Tensor, spec: QuantSpec | None = None, input_scale=None,
              input_offset=None, token_scale=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x as the kernels take it, and its per-row (per-group) scales: bf16 beside bf16 or fp8 weights where the CPU
    multiplies bf16 pairs (quantized activations are exact in bf16, their scales applied after the sums), fp32
    (dequantized) otherwise."""
    bf16_path = weight.dtype in (torch.bfloat16, FP8) and caps() & 1
    if spec is None or spec.act == "none":
        return (x.contiguous(), None) if bf16_path and x.dtype == torch.bfloat16 else (_f32(x), None)
    xq, xs = quantize_torch(x, spec, input_scale, input_offset, token_scale)
    if bf16_path:
        return xq.to(torch.bfloat16).contiguous(), xs.float().contiguous()
    K = x.shape[1]
    return (xq.float() * expand(xs.float(), K, GROUP if spec.act == "group" else K)).contiguous(), None


def _group(spec: QuantSpec | None) -> int:
    return GROUP if spec is not None and (spec.group or spec.act == "group") else 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for float weights: decode-size batches read the weight once, natively; larger ones take oneDNN."""
    if x.dim() != 2 or not 0 < x.shape[0] <= float_rows() or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    xin, _ = _operands(x, weight)
    out = torch.ops.glm45v_cpu.linear(xin, weight, None, None, 0, None if bias is None else _f32(bias))
    return out.to(x.dtype)


def linear_twin(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference for `linear` (and the op on every other device)."""
    return F.linear(x, weight, bias)


def quant_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 spec: QuantSpec, input_scale: torch.Tensor | None = None, input_offset: torch.Tensor | None = None,
                 quant_bias: torch.Tensor | None = None, token_scale: torch.Tensor | None = None) -> torch.Tensor:
    """quant_linear_torch's math with the 8-bit weight read once as stored, at every batch size: the input is
    quantized as the scheme says (in torch: [T, K] is small), the kernel applies the scales per row or group."""
    if x.dim() != 2 or x.shape[0] == 0 or quant_bias is not None or not weight.is_contiguous():
        return quant_linear_torch(x, weight, weight_scale, bias, spec, input_scale, input_offset, quant_bias,
                                  token_scale)
    xin, xs = _operands(x, weight, spec, input_scale, input_offset, token_scale)
    out = torch.ops.glm45v_cpu.linear(xin, weight, xs, weight_scale.float().contiguous(), _group(spec),
                                      None if bias is None else _f32(bias))
    return out.to(x.dtype)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              spec: QuantSpec | None = None, row_max: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> torch.Tensor:
    """fused_moe_torch for decode-size batches: the (token, expert) pairs sorted by expert, each chosen
    expert's gate/up and down weights read once per step in one call each, the SwiGLU and the scheme's
    activation quantization between them in torch."""
    T, K = topk_ids.shape
    if ((spec is None and T * K > MOE_PAIRS) or T == 0 or (spec is not None and spec.act == "static")
            or not w13.is_contiguous() or not w2.is_contiguous()):
        return fused_moe_torch(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, spec, row_max)
    E = w13.shape[0]
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat.clamp(max=E), minlength=E + 1)[:E]
    starts = torch.zeros(E + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=starts[1:])
    order = order[: int(starts[-1])]  # pairs for other ranks' experts (ids >= E) sort last and are dropped
    token_of = order // K
    group = _group(spec)

    def project(inp, w, scale, rows):
        xin, xs = _operands(inp, w, spec, token_scale=synced_scales(inp, spec, row_max) if spec else None)
        if rows is not None:
            xin, xs = xin[rows].contiguous(), None if xs is None else xs[rows].contiguous()
        return torch.ops.glm45v_cpu.experts(xin, starts, w, xs, None if scale is None else scale.float().contiguous(),
                                            group)

    # rounded where the twin rounds: its matmuls return the dtype of their (dequantized) input, and the SwiGLU
    # output is held in x's dtype before it is quantized again
    inner = x.dtype if spec is None or spec.act == "none" else torch.promote_types(x.dtype, torch.float32)
    gate, up = project(x, w13, w13_scale, token_of).to(inner).chunk(2, dim=-1)
    h = (F.silu(gate) * up).to(x.dtype)
    down = project(h, w2, w2_scale, None).to(inner).float()
    down *= topk_weights.flatten()[order, None].float()
    return torch.zeros(T, w2.shape[1], dtype=torch.float32).index_add_(0, token_of, down).to(x.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """Decode steps read keys and values where they lie in the paged cache; other steps take the twin."""
    if not meta.is_decode or q.shape[0] != meta.num_seqs:
        return paged_attention_torch(q, k_cache, v_cache, meta, scale)
    out = torch.ops.glm45v_cpu.decode_attention(_f32(q), k_cache, v_cache, meta.block_tables.int(),
                                                meta.context_lens.int(), scale)
    return out.to(q.dtype)


OPS: dict[str, Callable] = {"linear": linear, "quant_linear": quant_linear, "fused_moe": fused_moe,
                            "paged_attention": paged_attention}

# A self-check per kind of call the native op serves (None: the call goes to the twin anyway, nothing to check).
CHECK_KIND: dict[str, Callable] = {
    "linear": lambda x, w, b=None: ((x.dtype, w.dtype, tuple(w.shape), b is None)
                                    if x.dim() == 2 and 0 < x.shape[0] <= float_rows() else None),
    "quant_linear": lambda x, w, ws, b, spec, *static: (
        (x.dtype, w.dtype, tuple(w.shape), spec, b is not None, x.shape[0] <= float_rows())
        if x.dim() == 2 and x.shape[0] > 0 and (len(static) < 3 or static[2] is None) else None),
    "fused_moe": lambda x, w13, w2, w, ids, w13_scale=None, w2_scale=None, spec=None, row_max=None: (
        (x.dtype, tuple(w13.shape), ids.shape[1], spec, ids.numel() <= MOE_PAIRS)
        if 0 < ids.numel() and (ids.numel() <= MOE_PAIRS if spec is None else spec.act != "static") else None),
    "paged_attention": lambda q, kc, vc, meta, scale: (
        (q.dtype, kc.dtype, tuple(kc.shape[1:])) if meta.is_decode and q.shape[0] == meta.num_seqs else None),
}
