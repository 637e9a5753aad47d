"""Decode step time vs the byte floor, and vs transformers' generate, on real GLM-4.5V shapes (dummy weights).

    python benchmarks/decode_roofline.py --layers 4 --batch 1 --batch 32 --context 512 [--json]
    (the same as: glm45v bench --roofline ...)
"""

import argparse
import json

from rich.console import Console

from glm45v_npu.apps.roofline import roofline, table

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="glm-4.5v")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--device")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    result = roofline(a.model, a.layers, tuple(a.batch or [1, 32]), a.context, a.device, a.dtype,
                      not a.no_transformers)
    print(json.dumps(result)) if a.json else Console().print(table(result))
