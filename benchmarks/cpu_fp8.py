"""FP8 weights on a CPU: one GLM-4.5V expert's gate/up projection (N 2816, K 4096) timed four ways, against the
bf16 matmul in the same process. It says why `bench --quantization fp8` decodes slower than bf16 on a CPU: every
way of using FP8 weights there first widens them, and torch's CPU conversion from float8_e4m3fn is far slower
than the matmul it feeds (on a GPU the kernels read the bytes directly).

    python benchmarks/cpu_fp8.py [--tokens 4] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from glm45v_npu.kernels import ops  # noqa: E402
from glm45v_npu.kernels.quant import QuantSpec, quantize_weight  # noqa: E402

N, K = 2816, 4096


def timed(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, K, dtype=torch.bfloat16)
    w = torch.randn(N, K, dtype=torch.bfloat16) * 0.02
    spec = QuantSpec("fp8", "token")
    wq, ws = quantize_weight(w, spec)
    xs = x.float().abs().amax(-1, keepdim=True) / 448
    xq = (x.float() / xs).to(torch.float8_e4m3fn)
    engine = ops.impl("quant_linear", x.device)
    ways = {
        "bf16 weights: F.linear (baseline)": lambda: F.linear(x, w),
        "fp8: the engine's CPU op (float32 twin)": lambda: engine(x, wq, ws, None, spec),
        "fp8: dequantize to bf16, then F.linear": lambda: F.linear(x, wq.to(torch.bfloat16) * ws.to(torch.bfloat16)),
        "fp8: torch._scaled_mm (row x column scales)": lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=xs, scale_b=ws.float().reshape(1, -1), out_dtype=torch.bfloat16),
        "fp8 -> bf16 conversion alone": lambda: wq.to(torch.bfloat16),
    }
    base = None
    table = Table(title=f"{args.tokens} tokens x [{N}, {K}] on {torch.get_num_threads()} CPU threads")
    for col in ("way", "ms", "vs bf16"):
        table.add_column(col, justify="left" if col == "way" else "right")
    for name, fn in ways.items():
        s = timed(fn, args.repeat)
        base = base or s
        table.add_row(name, f"{s * 1e3:.1f}", f"{s / base:.1f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
