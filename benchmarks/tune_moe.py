"""Measure MoE tiles on a device and file the fastest per token-count bucket in the tile table.

    python benchmarks/tune_moe.py [--model glm-4.5v] [--tp 1,8] [--experts ep,tp] [--quant none,fp8/token]
                                  [--tokens 1,2,4,...,256] [--out glm45v_npu/kernels/tuned/cuda.json]

For each rank shape (tensor-parallel size x expert- or tensor-parallel experts), quantization and token count, every
candidate tile that the compile check accepts for this GPU (no spills, shared memory within the part) runs the
whole fused MoE (alignment, gate/up, down) on random inputs routed like GLM's router (top-k of the experts,
uniformly); the fastest by median time is written under its shape's key (tiles.moe_key), merged into `--out`,
which `tiles.moe_tile` reads from then on. Each tile's result is checked against the default tile's before it
is timed. `--smoke` runs two candidates at tiny sizes under Triton's interpreter on a CPU (it proves the script
runs; the figures mean nothing there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
if "--smoke" in sys.argv:  # the interpreter must be chosen before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

from glm45v_npu.kernels import fused_moe, tiles  # noqa: E402
from glm45v_npu.kernels.quant import QuantSpec, quantize_weight  # noqa: E402
from glm45v_npu.kernels.tiles import MOE_BUCKETS, Tile, moe_key  # noqa: E402
from glm45v_npu.model.hf_config import builtin_config, load_config  # noqa: E402

CANDIDATES = [Tile(bm, bn, bk, w, s) for bm, bn, bk, w, s in itertools.product(
    (16, 32, 64, 128), (32, 64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
QUANT = {"none": None, "fp8/token": QuantSpec("fp8", "token"), "fp8/group": QuantSpec("fp8", "group", 128),
         "int8/token": QuantSpec("int8", "token")}


def shapes(model: str, tps: list[int], kinds: list[str]) -> list[tuple[str, int, int, int, int]]:
    """(label, experts, hidden, intermediate, top_k) of one rank, for each tensor-parallel size and expert split."""
    t = load_config(builtin_config(model)).text
    out = []
    for tp, kind in itertools.product(tps, kinds):
        ep = kind == "ep"
        out.append((f"{model} tp{tp} {kind}", t.n_routed_experts // tp if ep else t.n_routed_experts,
                    t.hidden_size, t.moe_intermediate_size if ep else t.moe_intermediate_size // tp,
                    t.num_experts_per_tok))
    return out


def inputs(tokens: int, experts: int, hidden: int, inter: int, top_k: int, dtype, spec, device):
    g = torch.Generator(device="cpu").manual_seed(tokens)
    x = (torch.randn(tokens, hidden, generator=g) * 0.5).to(device, dtype)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) * inter**-0.5
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).to(device)
    weights = torch.rand(tokens, top_k, generator=g).to(device)
    if spec is None:
        return (x, w13.to(device, dtype), w2.to(device, dtype), weights, ids)
    q13, q2 = [quantize_weight(w, spec) for w in w13], [quantize_weight(w, spec) for w in w2]
    stack = lambda qs, i: torch.stack([q[i] for q in qs]).to(device)  # noqa: E731
    return (x, stack(q13, 0), stack(q2, 0), weights, ids, stack(q13, 1), stack(q2, 1), spec)


def timed(args, device, repeats: int) -> float:
    """Median seconds of one fused MoE over `repeats` runs (after one warm-up)."""
    fused_moe.fused_moe_triton(*args)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fused_moe.fused_moe_triton(*args)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync(device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def accepted(tile: Tile, launches, arch: str | None) -> bool:
    """Whether the compile check takes both launches with this tile on this part (None: no check, on a CPU)."""
    if arch is None:
        return True
    from compile_check import compile_launch

    return all(compile_launch(launch, arch)[0] for launch in launches)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="glm-4.5v")
    ap.add_argument("--tp", default="1,8")
    ap.add_argument("--experts", default="ep,tp", help="ep: experts split over ranks; tp: every expert split")
    ap.add_argument("--quant", default="none", help=f"comma-separated: {', '.join(QUANT)}")
    ap.add_argument("--tokens", default=",".join(str(b) for b in MOE_BUCKETS if b <= 256))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(tiles.TUNED / "cuda.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and two candidates on a CPU (interpreter)")
    args = ap.parse_args()
    console = Console()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        console.print("tune_moe: no GPU here; measuring needs one (--smoke proves the script on a CPU)")
        return 2
    if args.smoke:
        plan, candidates, repeats = [("smoke", 8, 64, 32, 2)], [Tile(16, 32, 64, 4, 3), Tile(32, 32, 64, 8, 3)], 1
        token_counts = [1, 4]
    else:
        plan = shapes(args.model, [int(t) for t in args.tp.split(",")], args.experts.split(","))
        candidates, repeats = CANDIDATES, args.repeats
        token_counts = [int(t) for t in args.tokens.split(",")]
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    arch = f"sm_{cap[0]}{cap[1]}" if cap else None
    dtype = getattr(torch, args.dtype)
    out_path = Path(args.out)
    table = json.loads(out_path.read_text()) if out_path.is_file() else {}
    table.setdefault("moe", {})
    results = Table(title=f"MoE tiles on {torch.cuda.get_device_name(device) if cap else 'CPU (smoke)'}")
    for col in ("shape", "quant", "tokens", "best tile", "ms", "default ms"):
        results.add_column(col)
    real_tile = fused_moe.moe_tile
    try:
        for (label, E, H, inter, top_k), quant in itertools.product(plan, args.quant.split(",")):
            spec = QUANT[quant]
            kind = fused_moe.quant_kind(spec)
            key = moe_key(E, H, inter, args.dtype, kind)
            for tokens in token_counts:
                data = inputs(tokens, E, H, inter, top_k, dtype, spec, device)
                default = real_tile("cuda", tokens, E, H, inter, args.dtype, kind)
                fused_moe.moe_tile = lambda *a, t=default: t
                want = fused_moe.fused_moe_triton(*data).float()
                base = timed(data, device, repeats)
                best = (base, default)
                for tile in track(candidates, description=f"{label} {quant} {tokens} tokens", console=console):
                    fused_moe.moe_tile = lambda *a, t=tile: t
                    launches = fused_moe.moe_launches(tokens, top_k, E, H, inter, dtype, "cuda", spec)
                    if not accepted(tile, launches, arch):
                        continue
                    try:
                        got = fused_moe.fused_moe_triton(*data).float()
                    except Exception:  # a tile the device cannot launch (resources): not a candidate
                        continue
                    if not torch.allclose(got, want, atol=2e-2, rtol=2e-2):
                        console.print(f"  {tile}: wrong result, skipped")
                        continue
                    seconds = timed(data, device, repeats)
                    best = min(best, (seconds, tile), key=lambda b: b[0])
                table["moe"].setdefault(key, {})[str(tiles.bucket(tokens, MOE_BUCKETS))] = best[1].as_list()
                results.add_row(label, quant, str(tokens), str(best[1].as_list()), f"{best[0] * 1e3:.3f}",
                                f"{base * 1e3:.3f}")
    finally:
        fused_moe.moe_tile = real_tile
    table["tuned_on"] = {"device": torch.cuda.get_device_name(device) if cap else "cpu (smoke)", "arch": arch,
                         "torch": torch.__version__, "triton": __import__("triton").__version__,
                         "date": time.strftime("%Y-%m-%d")}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    console.print(results)
    console.print(f"written: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
