"""Which implementation each op takes, decided per device type in this one place.

cpu: the torch twins. cuda: the Triton kernels. npu: the same Triton kernels through triton-ascend, and
torch_npu fused ops where they exist; every torch_npu op is checked against its twin on a small random input at
first use and, if it disagrees or raises, a warning is logged once and the twin is used from then on.
GLM45V_KERNELS=torch|triton overrides the choice (triton on a CPU needs TRITON_INTERPRET=1; tests use it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from .fused_moe import fused_moe_torch
from .kv_cache import store_kv_torch
from .paged_attention import paged_attention_torch
from .split_qkv_rmsnorm_rope import split_qkv_rmsnorm_rope_torch

log = logging.getLogger("glm45v_npu")

OPS = ("split_qkv_rmsnorm_rope", "store_kv", "paged_attention", "fused_moe")
TWINS: dict[str, Callable] = {
    "split_qkv_rmsnorm_rope": split_qkv_rmsnorm_rope_torch,
    "store_kv": store_kv_torch,
    "paged_attention": paged_attention_torch,
    "fused_moe": fused_moe_torch,
}


def backend(device: torch.device) -> str:
    forced = os.environ.get("GLM45V_KERNELS")
    if forced:
        if forced not in ("torch", "triton"):
            raise ValueError(f"GLM45V_KERNELS={forced}: expected torch or triton")
        return forced
    return "torch" if device.type == "cpu" else "triton"


def _triton_impls() -> dict[str, Callable]:
    from .fused_moe import fused_moe_triton
    from .kv_cache import store_kv_triton
    from .paged_attention import paged_attention_triton
    from .split_qkv_rmsnorm_rope import split_qkv_rmsnorm_rope_triton

    return {"split_qkv_rmsnorm_rope": split_qkv_rmsnorm_rope_triton, "store_kv": store_kv_triton,
            "paged_attention": paged_attention_triton, "fused_moe": fused_moe_triton}


_cache: dict[tuple[str, str], Callable] = {}


def impl(op: str, device: torch.device) -> Callable:
    key = (op, device.type)
    if key not in _cache:
        chosen = TWINS[op]
        if backend(device) == "triton":
            chosen = _triton_impls()[op]
        if device.type == "npu" and op in NPU_OPS:
            chosen = SelfChecked(op, NPU_OPS[op], TWINS[op], CHECK_INPUTS[op])
        _cache[key] = chosen
    return _cache[key]


def qkv_split(is_decode: bool, device: torch.device) -> Callable:
    """The conditional fused decode path: decode steps take the backend's split + norm + rope (the fused kernel
    on Triton backends); prefill, extend and mixed batches take split + optional QK norm + M-RoPE in plain ops."""
    return impl("split_qkv_rmsnorm_rope", device) if is_decode else split_qkv_rmsnorm_rope_torch


def describe(device: torch.device) -> dict[str, str]:
    out = {}
    for op in OPS:
        name = "triton" if backend(device) == "triton" else "torch twin"
        if device.type == "npu" and op in NPU_OPS:
            name = f"torch_npu (self-checked, twin fallback); {name} otherwise"
        if op == "split_qkv_rmsnorm_rope":
            name += " on decode steps, plain ops on prefill" if name.startswith("triton") else ""
        out[op] = name
    return out


class SelfChecked:
    """A device-specific fast op that proves itself against its portable twin the first time it runs."""

    def __init__(self, name: str, fast: Callable, twin: Callable, make_inputs: Callable):
        self.name, self.fast, self.twin, self.make_inputs = name, fast, twin, make_inputs
        self.verified: bool | None = None

    def _verify(self, device: torch.device) -> bool:
        try:
            args_fast = self.make_inputs(device)
            args_twin = [a.clone() if torch.is_tensor(a) else a for a in args_fast]
            got = self.fast(*args_fast)
            want = self.twin(*args_twin)
            got = got if got is not None else [a for a in args_fast if torch.is_tensor(a)]
            want = want if want is not None else [a for a in args_twin if torch.is_tensor(a)]
            got = got if isinstance(got, (list, tuple)) else [got]
            want = want if isinstance(want, (list, tuple)) else [want]
            ok = all(torch.allclose(g.float(), w.float(), atol=2e-2, rtol=2e-2) for g, w in zip(got, want))
            if not ok:
                log.warning("%s: torch_npu result disagrees with the portable twin; using the twin", self.name)
            return ok
        except Exception as e:  # any failure of the vendor op means: do not use it
            log.warning("%s: torch_npu op failed its self-check (%s); using the portable twin", self.name, e)
            return False

    def __call__(self, *args, **kwargs):
        if self.verified is None:
            device = next(a.device for a in args if torch.is_tensor(a))
            self.verified = self._verify(device)
        return (self.fast if self.verified else self.twin)(*args, **kwargs)


# --- torch_npu fast ops (thin wrappers with the twins' signatures) --------------------------------------------


def _npu_store_kv(k, v, k_cache, v_cache, slot_mapping):
    from ..platform import npu_reshape_and_cache

    npu_reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)


def _store_kv_inputs(device):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(6, 2, 16, generator=g).to(device, torch.bfloat16)
    v = torch.randn(6, 2, 16, generator=g).to(device, torch.bfloat16)
    caches = [torch.zeros(4, 4, 2, 16, dtype=torch.bfloat16, device=device) for _ in range(2)]
    slots = torch.tensor([0, 5, 9, -1, 14, 3], device=device)
    return [k, v, *caches, slots]


NPU_OPS: dict[str, Callable] = {"store_kv": _npu_store_kv}
CHECK_INPUTS: dict[str, Callable] = {"store_kv": _store_kv_inputs}
