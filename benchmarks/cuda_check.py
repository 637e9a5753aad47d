"""Engine on an accelerator vs the CPU path, on a tiny random checkpoint: greedy tokens (float32 must agree with
the CPU run token for token), bfloat16 agreement, KV sizing by warm-up profile, and a throughput figure.

    python benchmarks/cuda_check.py [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from glm45v_npu import LLM, SamplingParams
from glm45v_npu.testing.tiny_random import write_vl_checkpoint


def requests():
    from PIL import Image

    g = torch.Generator().manual_seed(0)

    def image(w, h):
        return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())

    out = [f"request {i}: say something" for i in range(4)]
    out.append({"messages": [{"role": "user", "content": [{"type": "image", "image": image(90, 60)},
                                                          {"type": "text", "text": "what is this?"}]}]})
    out.append({"messages": [{"role": "user", "content": [{"type": "image", "image": image(40, 120)},
                                                          {"type": "image", "image": image(20, 30)},
                                                          {"type": "text", "text": "compare"}]}]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    path = Path(tempfile.mkdtemp()) / "tiny"
    write_vl_checkpoint(path)
    reqs = requests()
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=True)
    cpu = LLM(path, device="cpu", dtype="float32", block_size=16, kv_cache_gib=0.05).generate(reqs, greedy)
    acc32 = LLM(path, device=args.device, dtype="float32", block_size=16, memory_fraction=0.05)
    print(f"{args.device} float32: {acc32.blocks.num_blocks} blocks = {acc32.capacity_tokens} tokens")
    out32 = acc32.generate(reqs, greedy)
    same = sum(a.token_ids == b.token_ids for a, b in zip(cpu, out32))
    lp = max(max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) for a, b in zip(cpu, out32))
    print(f"float32 {args.device} vs cpu: {same}/{len(reqs)} requests identical, max logprob diff {lp:.2e}")
    del acc32
    acc16 = LLM(path, device=args.device, dtype="bfloat16", block_size=16, memory_fraction=0.05)
    out16 = acc16.generate(reqs, greedy)
    agree = sum(x == y for a, b in zip(cpu, out16) for x, y in zip(a.token_ids, b.token_ids))
    print(f"bfloat16 {args.device} vs cpu float32: {agree}/{16 * len(reqs)} tokens agree")
    batch = [f"prompt number {i} " * 8 for i in range(32)]
    params = SamplingParams(max_tokens=64, temperature=0.8, seed=1, ignore_eos=True)
    acc16.generate(batch[:2], params)
    t = time.perf_counter()
    outs = acc16.generate(batch, params)
    dt = time.perf_counter() - t
    n = sum(len(o.token_ids) for o in outs)
    print(f"bfloat16 batch 32 x 64 tokens: {dt:.2f} s, {n / dt:.0f} tok/s (tiny model: measures engine overhead)")
    assert same == len(reqs), "float32 accelerator run differs from the CPU run"


if __name__ == "__main__":
    main()
