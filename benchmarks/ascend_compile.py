"""Compile every Triton kernel of the project for Ascend NPUs, without an NPU.

    python benchmarks/ascend_compile.py [--targets Ascend910B3,Ascend910_9392] [--jobs 2] [--list] [--self-test]

Run it in a venv of its own with triton-ascend (3.2.0), ascendnpu-ir (1.2.0, ships bishengir-compile), pybind11
and torch (tests/ascend_env.py builds one; triton-ascend installs into the same `triton` package as CUDA Triton,
so never in the project's venv). Each kernel goes through the real pipeline: Triton frontend, triton-adapter
lowering, bishengir's HFusion/HIVM passes with on-chip memory planning (a tile that does not fit fails with
"ub overflow" or "cc overflow"). Only CANN's last code-generation step (hivmc) is absent: a stand-in copies its
input, so `triton.compile` can finish. Nothing is executed.

The variants are what the launchers pick: each kernel's `*_launch` function is called with the per-rank shapes
of GLM-4.5V, GLM-4.5-Air, GLM-4.5 and the tiny test configs, at every tensor-parallel size they accept (1, 2, 4,
8, 16, KV heads replicated where ranks outnumber them), expert- and tensor-parallel experts, bf16 and fp32,
decode and prefill, every decode batch size up to 256 (graph buckets included), block sizes 16 and 128.
Prints one line per variant and target and a summary; exits 1 if any variant fails.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import stat
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even when started from the test suite

import torch  # noqa: E402

from glm45v_npu.errors import Glm45vError  # noqa: E402
from glm45v_npu.kernels._triton import Launch  # noqa: E402
from glm45v_npu.kernels.fused_moe import moe_launches  # noqa: E402
from glm45v_npu.kernels.kv_cache import store_kv_launch  # noqa: E402
from glm45v_npu.kernels.paged_attention import decode_launches, prefill_launch  # noqa: E402
from glm45v_npu.kernels.quant import QuantSpec, quantize_launch, scaled_mm_launch  # noqa: E402
from glm45v_npu.kernels.router import route_launch  # noqa: E402
from glm45v_npu.kernels.split_qkv_rmsnorm_rope import split_qkv_launch  # noqa: E402
from glm45v_npu.model.hf_config import (  # noqa: E402
    ModelConfig,
    check_layout,  # noqa: E402
    load_config,
    parse_config,
)
from glm45v_npu.model.hf_config import builtin_config as builtin  # noqa: E402
from glm45v_npu.parallel.layout import Layout  # noqa: E402

TARGETS = ("Ascend910B3", "Ascend910_9392")  # 910B, and an Atlas A3 part
TP_SIZES = (1, 2, 4, 8, 16)
DTYPES = (torch.bfloat16, torch.float32)
DECODE_BATCHES = range(1, 257)


def model_configs() -> dict[str, ModelConfig]:
    from glm45v_npu.testing.tiny_random import TEXT, text_kwargs
    from tests.tiny import TEXT_VARIANTS, VL_VARIANTS

    out = {name: load_config(builtin(name)) for name in ("glm-4.5v", "glm-4.5-air", "glm-4.5")}
    for name, spec in {"tiny-random": TEXT, **VL_VARIANTS, **TEXT_VARIANTS}.items():
        out[f"tiny:{name}"] = parse_config({"model_type": "glm4_moe", **text_kwargs(spec)}, f"tiny {name}")
    return out


def variants() -> dict[tuple, tuple[Launch, str]]:
    """Every distinct launch (by kernel, constexprs and argument types) -> (launch, where it first came from)."""
    found: dict[tuple, tuple[Launch, str]] = {}

    def add(launch: Launch, where: str) -> None:
        found.setdefault(launch.key(), (launch, where))

    for name, cfg in model_configs().items():
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
                                         "npu"), where)
                    add(store_kv_launch(1, nkv * t.head_dim, dtype, dtype, "npu"), where)
                    for bs in (16, 128):
                        for batch in DECODE_BATCHES:
                            for launch in decode_launches(batch, nq, nkv, t.head_dim, bs, dtype, dtype, "npu"):
                                add(launch, f"{where} decode batch {batch} block {bs}")
                        add(prefill_launch(2, 64, nq, nkv, t.head_dim, bs, dtype, dtype, "npu"),
                            f"{where} prefill block {bs}")
                    for launch in moe_launches(4, t.num_experts_per_tok, experts, t.hidden_size, inter, dtype, "npu"):
                        add(launch, where)
                    if dtype == torch.bfloat16:  # msmodelslim W8A8 / W8A8_DYNAMIC: the portable int8 path
                        for launch in int8_launches(t, nq, nkv, experts, inter, tp, dtype):
                            add(launch, f"{where} int8")
    glm = load_config(builtin("glm-4.5v")).text  # the fused op's whole surface, at GLM-4.5V's per-rank shapes
    for tp in TP_SIZES:
        nq, nkv = glm.num_attention_heads // tp, max(1, glm.num_key_value_heads // tp)
        for dtype in DTYPES:
            for q_bias in (False, True):
                for k_bias in (False, True):
                    add(split_qkv_launch(1, nq, nkv, glm.head_dim, glm.rotary_dim, dtype, True, q_bias, k_bias, "npu"),
                        f"split_qkv_rmsnorm_rope surface tp{tp} q_bias={q_bias} k_bias={k_bias}")
    return found


def int8_launches(t, nq: int, nkv: int, experts: int, inter: int, tp: int, dtype: torch.dtype) -> list[Launch]:
    """The int8 kernels one rank runs for a W8A8 / W8A8_DYNAMIC checkpoint: activation quantization, the int8
    GEMM of every linear layer (per-rank shapes, decode and prefill token counts), the int8 experts."""
    dynamic, static = QuantSpec("int8", "token"), QuantSpec("int8", "static")
    hd, h = t.head_dim, t.hidden_size
    dense = t.intermediate_size // tp
    shared = t.moe_intermediate_size * t.n_shared_experts // tp
    layers = [((nq + 2 * nkv) * hd, h), (h, nq * hd), (2 * dense, h), (h, dense), (2 * shared, h), (h, shared)]
    out = []
    for m in (1, 64, 2048):
        for n, k in layers:
            out.append(quantize_launch(m, k, dynamic, dtype, "npu"))
            for spec in (dynamic, static):
                for qbias in (False, True) if spec is static else (False,):
                    out.append(scaled_mm_launch(m, n, k, spec, dtype, True, "npu", qbias))
    out += moe_launches(4, t.num_experts_per_tok, experts, h, inter, dtype, "npu", dynamic)
    return out


# --- compiling ----------------------------------------------------------------------------------------------


def _prepare(arch_holder: dict) -> None:
    """Point triton-ascend at the target architecture and at a hivmc stand-in; use a fresh kernel cache."""
    import triton.backends as backends

    class _Arch:
        def get_arch(self) -> str:
            return arch_holder["arch"]

    backends.backends["ascend"].compiler.add_stages.__globals__["NPUUtils"] = _Arch


def _stand_in_hivmc(folder: Path) -> None:
    script = folder / "hivmc"
    script.write_text('#!/bin/sh\n# stand-in for CANN hivmc: copies its input to <-o value>.o\nout=""; src=""\n'
                      'while [ $# -gt 0 ]; do case "$1" in -o) out="$2"; shift 2;; -*) shift;; *) src="$1"; shift;;'
                      ' esac; done\ncp "$src" "$out.o"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


_ARCH: dict = {}


def _worker_init(arch_env: str) -> None:
    _ARCH["arch"] = arch_env
    _prepare(_ARCH)


def compile_launch(launch: Launch, arch: str) -> tuple[bool, float, str]:
    import triton
    from triton.backends.compiler import GPUTarget

    _ARCH["arch"] = arch
    fn = launch.kernel
    missing = [n for n in fn.arg_names if n not in launch.constexprs and n not in launch.types]
    if missing:
        return False, 0.0, f"no type for argument(s) {', '.join(missing)} in the launch description"
    signature = {n: "constexpr" if n in launch.constexprs else launch.types[n] for n in fn.arg_names}
    start = time.perf_counter()
    try:
        triton.compile(triton.compiler.ASTSource(fn, signature, constants=dict(launch.constexprs)),
                       target=GPUTarget("npu", arch, 0))
    except Exception as e:  # the compiler raises several types; each is a failure of this variant
        return False, time.perf_counter() - start, _reason(e)
    return True, time.perf_counter() - start, ""


def _reason(e: Exception) -> str:
    """The line of the compiler's report that says what went wrong (an overflow, an unsupported op, ...)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "[Triton]" not in ln and "[INFO]" not in ln]
    for needle in ("overflow, requires", "error:", "overflow", "error", "encounters"):
        hits = [ln for ln in lines if needle in ln.lower()]
        if hits:
            i = lines.index(hits[0])
            return " ".join(lines[i : i + 2])[:400]
    return f"{type(e).__name__}: {' '.join(lines)[:400]}"


_WORK: list[tuple[str, Launch, str]] = []  # (target, launch, where); forked workers inherit it


def _job(index: int) -> tuple[bool, float, str]:
    arch, launch, _ = _WORK[index]
    return compile_launch(launch, arch)


def _setup_environment(tmp: Path) -> None:
    """bishengir-compile (from the ascendnpu-ir package) and the hivmc stand-in on PATH."""
    extra = [str(tmp)] + [str(Path(p) / "ascendnpuir" / "bin") for p in sys.path
                          if (Path(p) / "ascendnpuir" / "bin").is_dir()]
    _stand_in_hivmc(tmp)
    os.environ["PATH"] = os.pathsep.join(extra + [os.environ.get("PATH", "")])
    os.environ["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # compile for real, never from a cache


def describe(launch: Launch) -> str:
    consts = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(launch.constexprs.items()))
    dtypes = sorted({v for v in launch.types.values() if v.startswith("*") and v not in ("*i32", "*i64")})
    return f"{launch.name}[{consts}] {'/'.join(dtypes)}"


def oversized_launch() -> Launch:
    """A store of a 2^20-element row: its tile cannot fit a 192 KiB UB, so the check must reject it."""
    return store_kv_launch(1, 2**20, torch.float32, torch.float32, "npu")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    ap.add_argument("--match", default="", help="only variants whose description contains this text")
    ap.add_argument("--self-test", action="store_true", help="only check that an oversized tile is rejected")
    args = ap.parse_args()
    targets = args.targets.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        _setup_environment(Path(tmp))
        _prepare(_ARCH)
        if args.self_test:
            ok, _, why = compile_launch(oversized_launch(), targets[0])
            print(f"oversized tile {describe(oversized_launch())}: {'ACCEPTED (the check cannot fail!)' if ok else 'rejected: ' + why}")
            return 1 if ok else 0
        found = {k: v for k, v in variants().items() if args.match in describe(v[0])}
        if args.list:
            for launch, where in found.values():
                print(f"{describe(launch)}  <- {where}")
            print(f"{len(found)} variants")
            return 0
        _WORK[:] = [(arch, launch, where) for arch in targets for launch, where in found.values()]
        items = _WORK
        start = time.perf_counter()
        failed = 0
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=context, initializer=_worker_init,
                                 initargs=(targets[0],)) as pool:
            for (arch, launch, where), (ok, seconds, why) in zip(items, pool.map(_job, range(len(items)), chunksize=4)):
                failed += not ok
                status = "ok  " if ok else "FAIL"
                print(f"{status} {arch:15s} {seconds:5.2f}s {describe(launch)}" + ("" if ok else f"\n     {where}: {why}"),
                      flush=True)
        elapsed = time.perf_counter() - start
        print(f"\nascend compile check: {len(found)} variants x {len(targets)} targets ({', '.join(targets)}) = "
              f"{len(items)} compiles, {len(items) - failed} ok, {failed} failed, {elapsed:.0f} s")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
