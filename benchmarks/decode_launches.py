"""Kernel launches per decode step, counted on the CPU: what a CUDA decode step launches (aten ops that compute,
and Triton launches), per dense layer, per MoE layer and outside the layers, then per step for the real models.

    python benchmarks/decode_launches.py [--batch 1] [--kernels triton|torch]

The step runs on GLM-4.5V's structure at small sizes (tests/step_probe.py: dense first layer, MoE layers with a
shared expert, q/k/v bias, partial M-RoPE), the Triton kernels under Triton's interpreter; a layer's launches
depend on its structure, not its sizes, so a real model's step is: outside + dense x its dense layers + MoE x its
MoE layers. At batch 1 a decode step is launch-bound: with or without graphs, fewer launches is faster.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from glm45v_npu.model.hf_config import builtin_config, load_config  # noqa: E402
from tests.step_probe import count_launches, decode_step, glm45v_small  # noqa: E402


def per_layer(batch: int) -> tuple[dict, dict]:
    graphs = decode_step(glm45v_small(), batch)
    with torch.inference_mode(), count_launches(graphs.model) as counter:
        graphs.forward(batch)
    layers = graphs.model.language_model.layers
    dense = next(i for i, layer in enumerate(layers) if not layer.is_moe)
    moe = next(i for i, layer in enumerate(layers) if layer.is_moe)
    counts = {"outside the layers": counter.by_layer["outside layers"], "dense layer": counter.by_layer[dense],
              "MoE layer": counter.by_layer[moe]}
    return counts, dict(counter.ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kernels", choices=("triton", "torch"), default="triton", help="the CUDA path or the twins")
    args = ap.parse_args()
    os.environ["GLM45V_KERNELS"] = args.kernels
    counts, ops = per_layer(args.batch)
    console = Console()
    table = Table(title=f"launches per decode step, batch {args.batch} ({args.kernels})")
    table.add_column("where")
    table.add_column("launches", justify="right")
    for where, n in counts.items():
        table.add_row(where, str(n))
    for name in ("glm-4.5v", "glm-4.5-air", "glm-4.5"):
        t = load_config(builtin_config(name)).text
        moe = sum(t.is_moe_layer(i) for i in range(t.num_hidden_layers))
        step = counts["outside the layers"] + counts["dense layer"] * (t.num_hidden_layers - moe) + counts["MoE layer"] * moe
        table.add_row(f"{name} step ({t.num_hidden_layers - moe} dense + {moe} MoE layers)", str(step))
    console.print(table)
    console.print("by op (all layers of the small model): " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))


if __name__ == "__main__":
    main()
