"""Tile sizes: the one table every Triton launcher reads, per target (cuda, npu) and shape bucket.

A launch's constexprs come from here, chosen by model shapes and by a bucket of the step's size (MoE: tokens in
the step; prefill attention: the longest query), never by the exact size: each bucket is one compile. The
defaults are the ones `benchmarks/compile_check.py` proves to compile for sm_80 / sm_89 / sm_90 (no spills,
shared memory within the part) and for Ascend 910B / A3 (within the UB). `benchmarks/tune_moe.py` measures MoE
tiles on a device and writes `tuned/<target>.json`, which takes precedence for the shapes it names.

CUDA and Ascend differ where their chips do: Ascend 910B has 20-24 AI cores with 192 KiB UB each and prefers
fewer, longer-running programs; num_warps and num_stages are CUDA's (triton-ascend plans its own pipeline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

TUNED = Path(__file__).parent / "tuned"
MOE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    block_k: int = 0  # 0 where the kernel has no K loop of its own (attention)
    num_warps: int = 4
    num_stages: int = 2

    def options(self, target: str) -> dict[str, int]:
        """Compile options of a launch with this tile (none on Ascend)."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages} if target == "cuda" else {}

    def as_list(self) -> list[int]:
        return [self.block_m, self.block_n, self.block_k, self.num_warps, self.num_stages]


# Fixed sizes: programs a decode step aims for (split-K), heads per split_qkv program, tokens per store_kv
# program, the quantize kernel's row block, elements of the MoE alignment's pairs x experts comparison.
FIXED: dict[str, dict] = {
    "cuda": {"decode_programs": 264, "split_heads": 16, "store_tokens": 1, "quant_block": 1024,
             "align_elements": 8192},
    "npu": {"decode_programs": 40, "split_heads": 16, "store_tokens": 8, "quant_block": 1024,
            "align_elements": 1024},
}

# The tables below are keyed by target, or by target/dtype where float32 operands (twice the registers of 16-bit
# ones) need smaller tiles or more warps; a row "upto: tile" serves step sizes up to `upto`.

# Decode attention: keys per step of the split-K loop (block_n).
DECODE: dict[str, Tile] = {"cuda": Tile(0, 32, 0, 4, 3), "cuda/float32": Tile(0, 32, 0, 8, 3), "npu": Tile(0, 32)}

# 8-bit GEMM (quantized linear layers); its rows are cut to the step's (quant._mm_tile).
QMM: dict[str, Tile] = {"cuda": Tile(64, 64, 64, 8, 3), "npu": Tile(64, 64, 128)}

# MoE (gate/up and down grouped GEMMs) by tokens in the step: few rows per expert want short tiles (most tiles
# hold one expert's one or two rows), long prefills wide ones.
MOE: dict[str, dict[int, Tile]] = {
    "cuda": {512: Tile(32, 32, 64, 8, 3), 4096: Tile(64, 32, 64, 8, 3)},
    "cuda/float32": {4096: Tile(32, 32, 64, 8, 3)},
    "npu": {128: Tile(16, 64, 64), 4096: Tile(64, 64, 64)},
}

# Prefill attention by the longest query of the step (block_m query rows x block_n keys per step).
PREFILL: dict[str, dict[int, Tile]] = {
    "cuda": {16: Tile(16, 32, 0, 4, 3), 4096: Tile(32, 32, 0, 8, 3)},
    "cuda/float32": {4096: Tile(16, 32, 0, 4, 3)},
    "npu": {16: Tile(16, 32), 64: Tile(32, 32), 4096: Tile(64, 32)},
}


def of(table: dict, target: str, dtype: str):
    """A table's entry for this target and operand dtype (torch's name without `torch.`)."""
    return table.get(f"{target}/{dtype}", table[target])


def fixed(target: str) -> dict:
    return FIXED[target]


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n (the last for anything larger)."""
    return next((b for b in buckets if b >= n), buckets[-1])


def _by_bucket(table: dict[int, Tile], n: int) -> Tile:
    return next((t for upto, t in sorted(table.items()) if n <= upto), table[max(table)])


def moe_key(experts: int, hidden: int, inter: int, dtype: str, quant: str) -> str:
    """How tuned MoE tiles are filed: one rank's expert shapes, activation dtype, quantization ('none' or
    weight/act, e.g. 'fp8/token')."""
    return f"E={experts},H={hidden},I={inter},{dtype},{quant}"


def moe_tile(target: str, tokens: int, experts: int, hidden: int, inter: int, dtype: str, quant: str) -> Tile:
    """The MoE tile for a step of `tokens` tokens: the tuned one for these shapes if the table has it, else the
    default for the token count and dtype."""
    tuned = _tuned(target).get("moe", {}).get(moe_key(experts, hidden, inter, dtype, quant))
    if tuned:
        b = bucket(tokens, MOE_BUCKETS)
        at = min((int(k) for k in tuned), key=lambda k: (abs(k - b), k))  # the nearest tuned bucket
        return Tile(*tuned[str(at)])
    return _by_bucket(of(MOE, target, dtype), tokens)


def prefill_tile(target: str, max_query_len: int, dtype: str) -> Tile:
    return _by_bucket(of(PREFILL, target, dtype), max_query_len)


@cache
def _tuned(target: str) -> dict:
    path = TUNED / f"{target}.json"
    return json.loads(path.read_text()) if path.is_file() else {}
