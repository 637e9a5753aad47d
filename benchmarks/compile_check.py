"""Compile every Triton kernel variant the launchers pick, for NVIDIA GPUs and Ascend NPUs, without either.

    python benchmarks/compile_check.py cuda   [--targets sm_80,sm_89,sm_90] [--jobs 2] [--list] [--self-test]
    python benchmarks/compile_check.py ascend [--targets Ascend910B3,Ascend910_9392] [--jobs 2] [--list] [--self-test]

cuda: in the project's venv. Triton's own compiler and the ptxas it ships compile each variant to a cubin;
registers, stack, local memory and shared memory are read from it with the cuobjdump it ships. A variant fails if
it does not compile, spills (stack or local memory: a register allocation that overflowed), uses more shared memory
than one block may have on that part (sm_80 163 KiB, sm_89 99 KiB, sm_90 227 KiB) or more registers than a block
of its warps can hold. Every variant is compiled for sm_80 and sm_90 and the FP8 ones (FP8 tensor cores) for sm_89
too; sm_80 gets the weight-only FP8 variants it runs instead. A table per kernel (registers, stack, shared memory) ends the run.

ascend: in a venv of its own with triton-ascend (3.2.0), ascendnpu-ir (1.2.0, ships bishengir-compile), pybind11
and torch (tests/ascend_env.py builds one; triton-ascend installs into the same `triton` package as CUDA Triton,
so never in the project's venv). Each kernel goes through the real pipeline: Triton frontend, triton-adapter
lowering, bishengir's HFusion/HIVM passes with on-chip memory planning (a tile that does not fit fails with
"ub overflow" or "cc overflow"). Only CANN's last code-generation step (hivmc) is absent: a stand-in copies its
input, so `triton.compile` can finish. Nothing is executed.

The variants are what the launchers pick: each kernel's `*_launch` function is called with the per-rank shapes
of GLM-4.5V, GLM-4.5-Air, GLM-4.5 and the tiny test configs, at every tensor-parallel size they accept (1, 2, 4,
8, 16, KV heads replicated where ranks outnumber them), expert- and tensor-parallel experts, bf16 and fp32,
decode and prefill (every row of the tile table: kernels/tiles.py), every decode batch size up to 256 (graph
buckets included), block sizes 16 and 128, and the 8-bit schemes each target runs (int8 W8A8 on both, FP8 on
CUDA: on sm_80, which has no e4m3 type, FP8 weights run weight-only and reach the kernels as bytes). Prints one
line per variant and target and a summary; exits 1 if any variant fails.
"""

from __future__ import annotations

import argparse
import inspect
import multiprocessing
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even when started from the test suite
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what Triton 3.9 does by default, without its warning

import torch  # noqa: E402

from glm45v_npu.errors import Glm45vError  # noqa: E402
from glm45v_npu.kernels._triton import Launch  # noqa: E402
from glm45v_npu.kernels.fused_moe import align_launch, moe_launches  # noqa: E402
from glm45v_npu.kernels.kv_cache import store_kv_launch  # noqa: E402
from glm45v_npu.kernels.paged_attention import decode_launches, prefill_launch  # noqa: E402
from glm45v_npu.kernels.quant import QuantSpec, dequant_mm_launch, quantize_launch, scaled_mm_launch  # noqa: E402
from glm45v_npu.kernels.rms_norm import rms_norm_launch  # noqa: E402
from glm45v_npu.kernels.router import route_launch  # noqa: E402
from glm45v_npu.kernels.split_qkv_rmsnorm_rope import split_qkv_launch  # noqa: E402
from glm45v_npu.kernels.tiles import MOE, PREFILL, Tile  # noqa: E402
from glm45v_npu.model.hf_config import ModelConfig, check_layout, load_config, parse_config  # noqa: E402
from glm45v_npu.model.hf_config import builtin_config as builtin  # noqa: E402
from glm45v_npu.parallel.layout import Layout  # noqa: E402

TARGETS = {"ascend": ("Ascend910B3", "Ascend910_9392"), "cuda": ("sm_80", "sm_89", "sm_90")}  # 910B and an A3 part
KIND = {"ascend": "npu", "cuda": "cuda"}  # the tile table each backend reads
TP_SIZES = (1, 2, 4, 8, 16)
DTYPES = (torch.bfloat16, torch.float32)
DECODE_BATCHES = range(1, 257)
SHARED_LIMIT = {80: 166912, 89: 101376, 90: 232448}  # bytes of shared memory one block may opt into
REGISTERS_PER_SM = 65536
INT8_TOKEN, INT8_STATIC = QuantSpec("int8", "token"), QuantSpec("int8", "static")
FP8_SCHEMES = (QuantSpec("fp8", "token"), QuantSpec("fp8", "group", 128), QuantSpec("fp8", "static"),
               QuantSpec("fp8", "none"), QuantSpec("fp8", "none", 128))  # the last two: weight-only checkpoints


def model_configs(only: str = "") -> dict[str, ModelConfig]:
    """The real configs and the tiny test ones; `only`: comma-separated names to keep (e.g. glm-4.5v)."""
    from glm45v_npu.testing.tiny_random import TEXT, text_kwargs
    from tests.tiny import TEXT_VARIANTS, VL_VARIANTS

    out = {name: load_config(builtin(name)) for name in ("glm-4.5v", "glm-4.5-air", "glm-4.5")}
    for name, spec in {"tiny-random": TEXT, **VL_VARIANTS, **TEXT_VARIANTS}.items():
        out[f"tiny:{name}"] = parse_config({"model_type": "glm4_moe", **text_kwargs(spec)}, f"tiny {name}")
    return {k: v for k, v in out.items() if not only or k in only.split(",")}


def token_counts(table: dict) -> list[int]:
    """One step size per row of a tile table (its upper bound): every tile a launcher can pick."""
    return sorted({upto for rows in table.values() for upto in rows})


def variants(kind: str, fp8_dot: bool = False, models: str = "") -> dict[tuple, tuple[Launch, str]]:
    """Every distinct launch (by kernel, constexprs, compile options and argument types) one target runs ->
    (launch, where it first came from). kind: 'npu' or 'cuda'; fp8_dot: the part has FP8 tensor cores."""
    found: dict[tuple, tuple[Launch, str]] = {}

    def add(launch: Launch, where: str) -> None:
        found.setdefault(launch.key(), (launch, where))

    for name, cfg in model_configs(models).items():
        t = cfg.text
        add(route_launch(1, t.n_routed_experts, t.num_experts_per_tok, t.n_group, t.topk_group, t.norm_topk_prob),
            f"{name} router (replicated on every rank)")
        for tp in TP_SIZES:
            for ep in (True, False):
                layout = Layout(0, tp, ep)
                try:
                    check_layout(cfg, layout)
                except Glm45vError:
                    continue  # the CLI refuses this size for this model
                _, nq = layout.even(t.num_attention_heads, "heads")
                _, nkv = layout.kv_heads(t.num_key_value_heads, "kv heads")
                experts = t.n_routed_experts // tp if ep else t.n_routed_experts
                inter = t.moe_intermediate_size if ep else t.moe_intermediate_size // tp
                for dtype in DTYPES:
                    where = f"{name} tp{tp} {'ep' if ep else 'tp-experts'} {str(dtype)[6:]}"
                    add(split_qkv_launch(1, nq, nkv, t.head_dim, t.rotary_dim, dtype, t.use_qk_norm, False, False,
                                         kind), where)
                    add(store_kv_launch(1, nkv * t.head_dim, dtype, dtype, kind), where)
                    for residual in (False, True):
                        add(rms_norm_launch(1, t.hidden_size, dtype, dtype, residual), where)
                    add(rms_norm_launch(1, t.head_dim, dtype, dtype, False), f"{where} (QK norm outside decode)")
                    for bs in (16, 128):
                        for batch in DECODE_BATCHES:
                            for launch in decode_launches(batch, nq, nkv, t.head_dim, bs, dtype, dtype, kind):
                                add(launch, f"{where} decode batch {batch} block {bs}")
                        for q_len in token_counts(PREFILL):
                            add(prefill_launch(2, q_len, nq, nkv, t.head_dim, bs, dtype, dtype, kind),
                                f"{where} prefill {q_len} block {bs}")
                    for tokens in token_counts(MOE):
                        for launch in moe_launches(tokens, t.num_experts_per_tok, experts, t.hidden_size, inter,
                                                   dtype, kind):
                            add(launch, f"{where} moe {tokens} tokens")
                        add(align_launch(experts, launch.constexprs["BLOCK_M"], kind), f"{where} moe {tokens} tokens")
                    if dtype == torch.bfloat16:  # 8-bit checkpoints: activations in bf16
                        specs = [INT8_TOKEN] + (list(FP8_SCHEMES) if kind == "cuda" else [])
                        for launch in quant_launches(t, nq, nkv, experts, inter, tp, dtype, kind, specs, fp8_dot):
                            add(launch, f"{where} 8-bit")
    glm = load_config(builtin("glm-4.5v")).text  # the fused op's whole surface, at GLM-4.5V's per-rank shapes
    for tp in TP_SIZES:
        nq, nkv = glm.num_attention_heads // tp, max(1, glm.num_key_value_heads // tp)
        for dtype in DTYPES:
            for q_bias in (False, True):
                for k_bias in (False, True):
                    add(split_qkv_launch(1, nq, nkv, glm.head_dim, glm.rotary_dim, dtype, True, q_bias, k_bias, kind),
                        f"split_qkv_rmsnorm_rope surface tp{tp} q_bias={q_bias} k_bias={k_bias}")
    return found


def quant_launches(t, nq: int, nkv: int, experts: int, inter: int, tp: int, dtype: torch.dtype, kind: str,
                   specs: list[QuantSpec], fp8_dot: bool) -> list[Launch]:
    """The 8-bit kernels one rank runs: activation quantization, the GEMM of every linear layer (per-rank shapes,
    decode and prefill token counts), the experts. FP8 without FP8 tensor cores runs weight-only (as
    quant.weight_only_unless_fp8_dot decides on the device)."""
    hd, h = t.head_dim, t.hidden_size
    dense = t.intermediate_size // tp
    shared = t.moe_intermediate_size * t.n_shared_experts // tp
    layers = [((nq + 2 * nkv) * hd, h), (h, nq * hd), (2 * dense, h), (h, dense), (2 * shared, h), (h, shared)]
    out = []
    for spec in specs:
        raw = False  # FP8 weights as bytes: where Triton has no e4m3 type (quant.fp8_as_bytes)
        if spec.weight == "fp8" and not fp8_dot:
            spec, raw = QuantSpec("fp8", "none", spec.group), True
        for m in (1, 64, 2048):
            for n, k in layers:
                if spec.act == "none":
                    out.append(dequant_mm_launch(m, n, k, spec, dtype, False, kind, raw))
                    continue
                if spec.act in ("token", "group"):
                    out.append(quantize_launch(m, k, spec, dtype, kind))
                for qbias in (False, True) if spec == INT8_STATIC else (False,):
                    out.append(scaled_mm_launch(m, n, k, spec, dtype, True, kind, qbias))
        if spec.act != "static":
            for tokens in token_counts(MOE):
                out += moe_launches(tokens, t.num_experts_per_tok, experts, h, inter, dtype, kind, spec, raw)
    if INT8_TOKEN in specs:  # msmodelslim W8A8 (static) linear layers beside W8A8_DYNAMIC experts
        for m in (1, 64, 2048):
            for n, k in layers:
                for qbias in (False, True):
                    out.append(scaled_mm_launch(m, n, k, INT8_STATIC, dtype, True, kind, qbias))
    return out


# --- compiling ----------------------------------------------------------------------------------------------


def _source(launch: Launch):
    """Triton's ASTSource for a launch (triton-ascend 3.2 names the constexprs `constants`, Triton 3.9
    `constexprs`)."""
    import triton

    fn = launch.kernel
    signature = {n: "constexpr" if n in launch.constexprs else launch.types[n] for n in fn.arg_names}
    name = "constexprs" if "constexprs" in inspect.signature(triton.compiler.ASTSource).parameters else "constants"
    return triton.compiler.ASTSource(fn, signature, **{name: dict(launch.constexprs)})


def compile_launch(launch: Launch, target: str) -> tuple[bool, float, str, dict]:
    """-> (ok, seconds, why not, resource usage)."""
    from triton.backends.compiler import GPUTarget

    fn = launch.kernel
    missing = [n for n in fn.arg_names if n not in launch.constexprs and n not in launch.types]
    if missing:
        return False, 0.0, f"no type for argument(s) {', '.join(missing)} in the launch description", {}
    start = time.perf_counter()
    try:
        import triton

        if target.startswith("sm_"):
            cap = int(target[3:])
            kernel = triton.compile(_source(launch), target=GPUTarget("cuda", cap, 32), options=dict(launch.options))
            usage = cubin_usage(kernel)
            why = _cuda_limits(usage, cap, kernel.metadata.num_warps)
            return not why, time.perf_counter() - start, why, usage
        _ARCH["arch"] = target
        triton.compile(_source(launch), target=GPUTarget("npu", target, 0))
    except Exception as e:  # the compiler raises several types; each is a failure of this variant
        return False, time.perf_counter() - start, _reason(e), {}
    return True, time.perf_counter() - start, "", {}


def cubin_usage(kernel) -> dict:
    """Registers, stack, local and shared memory (static + dynamic) of a compiled kernel, read from its cubin."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump gave no resource usage: {text[:300]}")
    return {"registers": int(m[1]), "stack": int(m[2]), "local": int(m[4]),
            "shared": int(m[3]) + int(kernel.metadata.shared)}


def _cuda_limits(usage: dict, cap: int, warps: int) -> str:
    if usage["shared"] > SHARED_LIMIT[cap]:
        return f"shared memory {usage['shared']} bytes > {SHARED_LIMIT[cap]} on sm_{cap}"
    if usage["stack"] or usage["local"]:
        return f"spills: {usage['stack']} bytes of stack, {usage['local']} of local memory per thread"
    if usage["registers"] * warps * 32 > REGISTERS_PER_SM:
        return f"{usage['registers']} registers x {warps * 32} threads > {REGISTERS_PER_SM}"
    return ""


def _reason(e: Exception) -> str:
    """The line of the compiler's report that says what went wrong (an overflow, an unsupported op, ...)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "[Triton]" not in ln and "[INFO]" not in ln]
    for needle in ("overflow, requires", "error:", "overflow", "error", "encounters"):
        hits = [ln for ln in lines if needle in ln.lower()]
        if hits:
            i = lines.index(hits[0])
            return " ".join(lines[i : i + 2])[:400]
    return f"{type(e).__name__}: {' '.join(lines)[:400]}"


# --- Ascend: triton-ascend's architecture query and CANN's last step, stood in --------------------------------

_ARCH: dict = {}


def _prepare_ascend() -> None:
    """Point triton-ascend at the target architecture (set per compile in _ARCH)."""
    import triton.backends as backends

    class _Arch:
        def get_arch(self) -> str:
            return _ARCH["arch"]

    backends.backends["ascend"].compiler.add_stages.__globals__["NPUUtils"] = _Arch


def _setup_ascend(tmp: Path) -> None:
    """bishengir-compile (from the ascendnpu-ir package) and a hivmc stand-in on PATH."""
    script = tmp / "hivmc"
    script.write_text('#!/bin/sh\n# stand-in for CANN hivmc: copies its input to <-o value>.o\nout=""; src=""\n'
                      'while [ $# -gt 0 ]; do case "$1" in -o) out="$2"; shift 2;; -*) shift;; *) src="$1"; shift;;'
                      ' esac; done\ncp "$src" "$out.o"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    extra = [str(tmp)] + [str(Path(p) / "ascendnpuir" / "bin") for p in sys.path
                          if (Path(p) / "ascendnpuir" / "bin").is_dir()]
    os.environ["PATH"] = os.pathsep.join(extra + [os.environ.get("PATH", "")])
    _ARCH["arch"] = TARGETS["ascend"][0]
    _prepare_ascend()


# --- the run ------------------------------------------------------------------------------------------------

_WORK: list[tuple[str, Launch, str]] = []  # (target, launch, where); forked workers inherit it


def _job(index: int) -> tuple[bool, float, str, dict]:
    target, launch, _ = _WORK[index]
    return compile_launch(launch, target)


def describe(launch: Launch) -> str:
    consts = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(launch.constexprs.items()))
    dtypes = sorted({v for v in launch.types.values() if v.startswith("*") and v not in ("*i32", "*i64")})
    options = "".join(f" {k}={v}" for k, v in sorted(launch.options.items()))
    return f"{launch.name}[{consts}]{options} {'/'.join(dtypes)}"


def oversized(backend: str) -> list[Launch]:
    """Launches the check must reject. Ascend: a store of a 2^20-element row (its tile cannot fit a 192 KiB UB).
    CUDA: a MoE tile of 256 x 128 x 256 (over any part's shared memory), and a decode tile of 256 keys (more
    registers than a thread has: it spills); the smallest such tiles, each compiled in seconds."""
    if backend == "ascend":
        return [store_kv_launch(1, 2**20, torch.float32, torch.float32, "npu")]
    from glm45v_npu.kernels import fused_moe, paged_attention

    big = Tile(256, 128, 256, num_warps=8, num_stages=2)
    moe = fused_moe.moe_launches(4096, 8, 128, 4096, 1408, torch.bfloat16, "cuda")[0]
    moe = Launch(moe.kernel, moe.grid, {**moe.constexprs, "BLOCK_M": big.block_m, "BLOCK_N": big.block_n,
                                        "BLOCK_K": big.block_k}, moe.types, big.options("cuda"))
    decode = paged_attention.decode_launches(1, 12, 1, 128, 16, torch.bfloat16, torch.bfloat16, "cuda")[0]
    decode = Launch(decode.kernel, decode.grid, {**decode.constexprs, "BLOCK_N": 256}, decode.types, decode.options)
    return [moe, decode]


def self_test(backend: str, targets: list[str]) -> int:
    accepted = 0
    for launch in oversized(backend):
        target = targets[-1]
        ok, _, why, _ = compile_launch(launch, target)
        accepted += ok
        print(f"oversized {target} {describe(launch)}: {'ACCEPTED (the check cannot fail!)' if ok else 'rejected: ' + why}")
    return 1 if accepted else 0


def usage_table(results: list[tuple[str, Launch, dict]]) -> str:
    """Per kernel and target: variants, registers (min-max), largest stack and shared memory."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for target, launch, usage in results:
        if usage:
            rows.setdefault((launch.name, target), []).append(usage)
    lines = [f"{'kernel':32s} {'target':7s} {'variants':>8s} {'registers':>10s} {'stack':>6s} {'shared KiB':>10s}"]
    for (name, target), us in sorted(rows.items()):
        regs = sorted(u["registers"] for u in us)
        lines.append(f"{name:32s} {target:7s} {len(us):8d} {regs[0]:>4d}-{regs[-1]:<5d} {max(u['stack'] for u in us):6d} "
                     f"{max(u['shared'] for u in us) / 1024:10.1f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backend", choices=sorted(TARGETS))
    ap.add_argument("--targets", help="comma-separated (default: all of the backend's)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    ap.add_argument("--match", default="", help="only variants whose description contains this text")
    ap.add_argument("--models", default="", help="only these configs (comma-separated, e.g. glm-4.5v; default all)")
    ap.add_argument("--self-test", action="store_true", help="only check that oversized tiles are rejected")
    args = ap.parse_args()
    targets = args.targets.split(",") if args.targets else list(TARGETS[args.backend])
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton-cache")  # compile for real, never from a cache
        if args.backend == "ascend":
            _setup_ascend(Path(tmp))
        if args.self_test:
            return self_test(args.backend, targets)
        work = []
        by_fp8: dict[bool, dict] = {}
        for target in targets:
            fp8 = target.startswith("sm_") and int(target[3:]) >= 89
            if fp8 not in by_fp8:
                by_fp8[fp8] = variants(KIND[args.backend], fp8, args.models)
            work += [(target, launch, where) for launch, where in by_fp8[fp8].values()
                     if args.match in describe(launch) and (target != "sm_89" or "fp8e4nv" in describe(launch))]
        if args.list:
            for target, launch, where in work:
                print(f"{target:15s} {describe(launch)}  <- {where}")
            print(f"{len(work)} compiles")
            return 0
        _WORK[:] = work
        start = time.perf_counter()
        failed, done = 0, []
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=context) as pool:
            for (target, launch, where), (ok, seconds, why, usage) in zip(
                    work, pool.map(_job, range(len(work)), chunksize=4)):
                failed += not ok
                done.append((target, launch, usage))
                extra = "" if not usage else f" reg {usage['registers']} stack {usage['stack']} smem {usage['shared']}"
                print(f"{'ok  ' if ok else 'FAIL'} {target:15s} {seconds:5.2f}s{extra} {describe(launch)}"
                      + ("" if ok else f"\n     {where}: {why}"), flush=True)
        elapsed = time.perf_counter() - start
        if args.backend == "cuda":
            print("\n" + usage_table(done))
        variants_n = len({launch.key() for _, launch, _ in work})
        print(f"\n{args.backend} compile check: {variants_n} variants over {len(targets)} targets ({', '.join(targets)})"
              f" = {len(work)} compiles, {len(work) - failed} ok, {failed} failed, {elapsed:.0f} s")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
