"""Which implementation each op takes, decided per device type in this one place.

cpu: the native CPU kernels (kernels/cpu.py: decode-size matmuls, routed experts and decode attention, built when
an engine starts: prepare) where they exist, each a SelfChecked wrapper proven against its twin on its first real call of each
kind; the torch twins for everything else. cuda: the Triton kernels (ops without one run their twin). npu:
torch_npu fused ops where they exist, each a SelfChecked wrapper that proves itself against the twin on its first
real call (per kind of call) and otherwise hands over to the portable path, the same Triton kernels through
triton-ascend. GLM45V_KERNELS=torch|triton|native overrides the portable choice (torch: the twins only; triton on
a CPU needs TRITON_INTERPRET=1; tests use both).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from . import cpu, npu_ops
from .fused_moe import fused_moe_torch
from .kv_cache import store_kv_torch
from .paged_attention import paged_attention_torch
from .quant import quant_linear_torch
from .reference import apply_rope, rms_norm
from .rms_norm import add_rms_norm_torch
from .router import route_torch
from .split_qkv_rmsnorm_rope import split_qkv_rmsnorm_rope_torch

log = logging.getLogger("glm45v_npu")

TWINS: dict[str, Callable] = {
    "split_qkv_rmsnorm_rope": split_qkv_rmsnorm_rope_torch,
    "store_kv": store_kv_torch,
    "paged_attention": paged_attention_torch,
    "fused_moe": fused_moe_torch,
    "route": route_torch,
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm_torch,
    "apply_rope": apply_rope,
    "quant_linear": quant_linear_torch,
    "linear": cpu.linear_twin,
}
OPS = tuple(TWINS)


def _triton_impls() -> dict[str, Callable]:
    from .fused_moe import fused_moe_triton
    from .kv_cache import store_kv_triton
    from .paged_attention import paged_attention_triton
    from .quant import quant_linear_triton
    from .rms_norm import add_rms_norm_triton, rms_norm_triton
    from .router import route_triton
    from .split_qkv_rmsnorm_rope import split_qkv_rmsnorm_rope_triton

    return {"split_qkv_rmsnorm_rope": split_qkv_rmsnorm_rope_triton, "store_kv": store_kv_triton,
            "paged_attention": paged_attention_triton, "fused_moe": fused_moe_triton, "route": route_triton,
            "quant_linear": quant_linear_triton, "rms_norm": rms_norm_triton, "add_rms_norm": add_rms_norm_triton}


TRITON_OPS = ("split_qkv_rmsnorm_rope", "store_kv", "paged_attention", "fused_moe", "route", "quant_linear",
              "rms_norm", "add_rms_norm")

# torch_npu fast paths, and what makes two calls different enough to check each kind once. A kind of None means
# the fast op does not serve that call (it goes to the portable path, with no warning and no giving up):
# attention on a decode-graph step, whose lengths live on the device only (the torch_npu op takes them as host
# lists, which a captured graph would freeze), routing without renormalisation (the torch_npu op always
# renormalises), and 8-bit calls whose per-token scales are agreed over ranks (npu_dynamic_quant scales locally).
NPU_OPS: dict[str, Callable] = {
    "store_kv": npu_ops.store_kv,
    "paged_attention": npu_ops.paged_attention,
    "fused_moe": npu_ops.fused_moe,
    "route": npu_ops.route,
    "rms_norm": npu_ops.rms_norm,
    "add_rms_norm": npu_ops.add_rms_norm,
    "apply_rope": npu_ops.apply_rope,
    "quant_linear": npu_ops.quant_linear,
}
CHECK_KIND: dict[str, Callable[..., Any]] = {
    "paged_attention": lambda q, kc, vc, meta, scale: (
        None if meta.host_context_lens is None else (meta.is_decode, q.dtype, kc.shape[1:])),
    "rms_norm": lambda x, w, eps, bias=None: (x.dtype, x.shape[-1], bias is None),
    "add_rms_norm": lambda x, residual, w, eps: (x.dtype, x.shape[-1]),
    "apply_rope": lambda x, cos, sin: (x.dtype, x.shape[1:], cos.shape[-1]),
    "route": lambda logits, bias, top_k, n_group, topk_group, renormalize, scaling: (
        (logits.dtype, logits.shape[-1], top_k, n_group, topk_group, scaling) if renormalize else None),
    "fused_moe": lambda x, w13, w2, w, ids, w13_scale=None, w2_scale=None, spec=None, row_max=None: (
        (x.dtype, w13.shape, ids.shape[1], spec) if spec is None or (spec.weight == "int8" and spec.act == "token"
                                                                     and row_max is None) else None),
    "quant_linear": lambda x, w, ws, b, spec, *static: (
        (x.dtype, w.shape, spec, b is not None) if spec.weight == "int8" and spec.act == "token"
        and (len(static) < 4 or static[3] is None) else None),
    "store_kv": lambda k, v, kc, vc, slots: (k.dtype, kc.dtype, kc.shape[1:]),
}


def _stored(k, v, k_cache, v_cache, slot_mapping) -> bool:
    """store_kv is in place: check the rows it wrote instead of running a twin on a copy of the whole cache."""
    keep = slot_mapping >= 0
    rows = slot_mapping[keep]
    kc, vc = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    return torch.equal(kc[rows], k[keep].to(kc.dtype)) and torch.equal(vc[rows], v[keep].to(vc.dtype))


IN_PLACE_CHECK: dict[str, Callable[..., bool]] = {"store_kv": _stored}


def backend(kind: str) -> str:
    """native, torch or triton for a device type (cpu, cuda, npu), unless GLM45V_KERNELS says otherwise."""
    forced = os.environ.get("GLM45V_KERNELS")
    if forced:
        if forced not in ("torch", "triton", "native"):
            raise ValueError(f"GLM45V_KERNELS={forced}: expected torch, triton or native")
        return forced
    return "native" if kind == "cpu" else "triton"


_cache: dict[tuple[str, str], Callable] = {}


def portable(op: str, device: torch.device) -> Callable:
    """The op on this device without vendor libraries: its Triton kernel on a Triton backend, the CPU's native
    kernel (self-checked) on a CPU, else its twin."""
    chosen = backend(device.type)
    if chosen == "triton" and op in TRITON_OPS:
        return _triton_impls()[op]
    if chosen == "native" and device.type == "cpu" and op in cpu.OPS and cpu.available():
        return SelfChecked(op, cpu.OPS[op], TWINS[op], TWINS[op], cpu.CHECK_KIND[op], source="native CPU kernel",
                           agree=agree_rows)
    return TWINS[op]


def prepare(device: torch.device) -> None:
    """Build what this device's kernels need before the first step, not during it: the CPU's native kernels
    compile here (once per machine, 10-30 s), while the engine starts rather than under a request's first token."""
    if device.type == "cpu" and backend("cpu") == "native":
        cpu.available()


def impl(op: str, device: torch.device) -> Callable:
    key = (op, device.type)
    if key not in _cache:
        chosen = portable(op, device)
        if device.type == "npu" and op in NPU_OPS:
            chosen = SelfChecked(op, NPU_OPS[op], chosen, TWINS[op], CHECK_KIND[op], IN_PLACE_CHECK.get(op))
        _cache[key] = chosen
    return _cache[key]


def qkv_split(is_decode: bool, device: torch.device) -> Callable:
    """The conditional fused decode path: decode steps take the backend's split + norm + rope (the fused kernel
    on Triton backends); prefill, extend and mixed batches take the split, the optional QK norm and M-RoPE as
    separate ops (each the device's best: torch_npu's on an NPU, the twins elsewhere)."""
    return impl("split_qkv_rmsnorm_rope", device) if is_decode else split_qkv_plain


def split_qkv_plain(qkv: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """split_qkv_rmsnorm_rope as separate ops (same signature): the twin's split with the device's norm and
    rope."""
    return split_qkv_rmsnorm_rope_torch(qkv, *args, norm=impl("rms_norm", qkv.device),
                                        rope=impl("apply_rope", qkv.device), **kwargs)


def describe(device: torch.device) -> dict[str, str]:
    """The path each op takes on this device."""
    return {op: _path(op, device.type) for op in OPS}


def describe_all() -> dict[str, dict[str, str]]:
    """The path each op would take on each device type (for `glm45v info`)."""
    return {op: {kind: _path(op, kind) for kind in ("cpu", "cuda", "npu")} for op in OPS}


def _path(op: str, kind: str) -> str:
    triton = backend(kind) == "triton" and op in TRITON_OPS
    name = "triton" if triton else "torch twin"
    if kind == "cpu" and backend(kind) == "native" and op in cpu.OPS:
        name = "native (decode sizes), else torch twin"
    if kind == "npu":
        name = "triton-ascend" if triton else name
        if op in NPU_OPS:
            name = f"torch_npu, else {name}"
    return name


class SelfChecked:
    """A device-specific fast op that proves itself against its portable twin on its first real call of each
    kind (`kind(*args)`: shapes, modes; None = a call the fast op does not serve, which goes to the fallback):
    both run on the same inputs, and if they disagree or the fast op raises, one warning is logged and the
    fallback serves from then on. A later error does the same. An in-place op is checked by `written` (what it
    should have written) instead, and redone by the fallback when wrong."""

    def __init__(self, name: str, fast: Callable, fallback: Callable, twin: Callable, kind: Callable[..., Any],
                 written: Callable[..., bool] | None = None, source: str = "torch_npu",
                 agree: Callable[[Any, Any], bool] | None = None):
        self.name, self.fast, self.fallback, self.twin, self.kind = name, fast, fallback, twin, kind
        self.written, self.source, self.agree = written, source, agree or _agree
        self.checked: set = set()
        self.failed = False

    @property
    def verified(self) -> bool | None:
        return False if self.failed else (True if self.checked else None)

    def _give_up(self, why: str) -> None:
        self.failed = True
        log.warning("%s: %s %s; using the portable path", self.name, self.source, why)

    def __call__(self, *args, **kwargs):
        key = None if self.failed else self.kind(*args, **kwargs)
        if key is None:
            return self.fallback(*args, **kwargs)
        if key in self.checked:
            try:
                return self.fast(*args, **kwargs)
            except Exception as e:  # any failure of the vendor op: do not use it again
                self._give_up(f"op failed ({type(e).__name__}: {e})")
                return self.fallback(*args, **kwargs)
        want = None if self.written else self.twin(*args, **kwargs)
        try:
            got = self.fast(*args, **kwargs)
            ok = self.written(*args, **kwargs) if self.written else self.agree(got, want)
        except Exception as e:  # any failure of the vendor op means: do not use it
            self._give_up(f"op failed its self-check ({type(e).__name__}: {e})")
            ok, got = None, None
        if ok:
            self.checked.add(key)
            return got
        if ok is False:
            self._give_up("result disagrees with the portable twin")
        return self.fallback(*args, **kwargs) if self.written else want


def _agree(got: Any, want: Any) -> bool:
    got = list(got) if isinstance(got, (list, tuple)) else [got]
    want = list(want) if isinstance(want, (list, tuple)) else [want]
    pairs = [(g, w) for g, w in zip(got, want) if torch.is_tensor(g) and torch.is_tensor(w)]
    if len(got) != len(want) or not pairs:
        return False
    for g, w in pairs:
        if g.shape != w.shape:
            return False
        if not g.is_floating_point():
            if not torch.equal(g.long().sort(-1)[0], w.long().sort(-1)[0]):  # ids: the same set per row
                return False
        elif not torch.allclose(g.float(), w.float(), atol=2e-2, rtol=2e-2):
            return False
    return True


def agree_rows(got: Any, want: Any) -> bool:
    """Row by row within 2% in L2 norm, and finite where the twin is: the native CPU kernels sum in another
    order than the twins, so an 8-bit activation quantized from their sums can land one step away now and then
    (one element off by a few percent), while a wrong kernel is off everywhere."""
    if not (torch.is_tensor(got) and torch.is_tensor(want)) or got.shape != want.shape:
        return False
    g = got.double().reshape(-1, got.shape[-1]) if got.dim() else got.double().reshape(1, 1)
    w = want.double().reshape(-1, want.shape[-1]) if want.dim() else want.double().reshape(1, 1)
    if not torch.equal(torch.isfinite(g), torch.isfinite(w)):
        return False
    g, w = g.nan_to_num(), w.nan_to_num()
    return bool(((g - w).norm(dim=-1) <= 2e-2 * w.norm(dim=-1) + 1e-6 * w.shape[-1] ** 0.5).all())
