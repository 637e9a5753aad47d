"""Probes for the decode step a device graph captures, run on the CPU: host syncs (each entry point that makes the
host wait for the device, recorded where it was called) and kernel launches (what a CUDA step would launch:
aten ops that compute, and Triton launches). The step runs the CUDA path's code: the Triton kernels under
Triton's interpreter (GLM45V_KERNELS=triton, TRITON_INTERPRET=1), or the torch_npu path with tests/fake_torch_npu.

What happens inside a kernel launch (the interpreter's own work) or inside a stand-in torch_npu op is device work
and is not probed; the host code around them is.
"""

from __future__ import annotations

import json
import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from glm45v_npu.engine.graph import DecodeGraphs
from glm45v_npu.engine.runner import allocate_kv_cache
from glm45v_npu.kernels import _triton
from glm45v_npu.model.glm4v_moe import build_model
from glm45v_npu.model.hf_config import builtin_config, parse_config
from glm45v_npu.model.loader import init_dummy_weights
from glm45v_npu.testing.tiny_random import VISION

# GLM-4.5V's structure (dense first layer, MoE layers with a shared expert, q/k/v bias, no QK norm, partial
# rotary, M-RoPE, group routing as configured) at test sizes; launch counts depend on the structure, not the sizes.
SMALL = dict(hidden_size=64, num_attention_heads=12, num_key_value_heads=1, head_dim=32, intermediate_size=96,
             moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=8, num_hidden_layers=3,
             vocab_size=512)
_DEVICE_WORK = [0]  # > 0 while a kernel or a stand-in vendor op runs


def glm45v_small(**overrides):
    """GLM-4.5V's own config.json with its sizes shrunk (overrides change more, e.g. use_qk_norm)."""
    raw = json.loads(builtin_config("glm-4.5v").read_text())
    raw["text_config"].update(SMALL, **overrides)
    raw["text_config"]["rope_scaling"]["mrope_section"] = [4, 2, 2]  # 8 frequencies: head_dim 32, rotary half
    raw["vision_config"].update(VISION, out_hidden_size=SMALL["hidden_size"])  # built, not used by decode
    return parse_config(raw, "glm-4.5v (small)")


def decode_step(cfg, bucket: int, block_size: int = 4, seed: int = 0) -> DecodeGraphs:
    """The model with dummy weights, a KV cache, and a decode step of `bucket` sequences (every row real, contexts
    of different lengths) written into the graph's static buffers."""
    torch.manual_seed(seed)
    model = build_model(cfg, torch.float32, "cpu")
    init_dummy_weights(model, seed=seed)
    lens = [1 + (7 * i) % 23 for i in range(bucket)]
    per_seq = -(-max(lens) // block_size)
    allocate_kv_cache(model, bucket * per_seq + 1, block_size, torch.device("cpu"), torch.float32)
    graphs = DecodeGraphs(model, bucket, per_seq, block_size, torch.device("cpu"), capture=False)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(bucket)]
    positions = torch.tensor([[n - 1 for n in lens]] * 3)
    graphs.load([5 + i for i in range(bucket)], positions, lens, tables)
    return graphs


@contextmanager
def device_work():
    _DEVICE_WORK[0] += 1
    try:
        yield
    finally:
        _DEVICE_WORK[0] -= 1


@contextmanager
def kernels_are_device_work(*vendor_modules):
    """Triton launches (and the ops of stand-in vendor modules) count as device work: not probed inside."""
    real = _triton.Launch.__call__

    def launch(self, *args):
        with device_work():
            return real(self, *args)

    patched = []
    for module in vendor_modules:
        for name in [n for n in dir(module) if n.startswith(("npu", "_npu"))]:
            fn = getattr(module, name)
            patched.append((module, name, fn))
            setattr(module, name, lambda *a, _fn=fn, **k: _run_as_device(_fn, a, k))
    _triton.Launch.__call__ = launch
    try:
        yield
    finally:
        _triton.Launch.__call__ = real
        for module, name, fn in patched:
            setattr(module, name, fn)


def _run_as_device(fn, args, kwargs):
    with device_work():
        return fn(*args, **kwargs)


# --- host syncs ----------------------------------------------------------------------------------------------

_ALWAYS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere", "cpu", "numpy",
           "masked_select", "bincount", "unique", "unique_consecutive", "tensor", "as_tensor"}


def _sync_reason(func, args, kwargs) -> str | None:
    name = getattr(func, "__name__", str(func))
    if name in _ALWAYS:
        return f"{name}()"
    if name == "where" and len(args) == 1:
        return "where(condition) (nonzero)"
    if name == "repeat_interleave" and torch.is_tensor(args[1] if len(args) > 1 else kwargs.get("repeats")) \
            and kwargs.get("output_size") is None:
        return "repeat_interleave with tensor repeats and no output_size"
    if name in ("__getitem__", "__setitem__"):
        index = args[1] if len(args) > 1 else None
        parts = index if isinstance(index, tuple) else (index,)
        if any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts):
            return f"boolean-mask {name}"
    return None


class HostSyncs(TorchFunctionMode):
    """Records every host-sync entry point called outside device work: (what, where in the project)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _DEVICE_WORK[0]:
            why = _sync_reason(func, args, kwargs)
            if why is not None:
                self.calls.append((why, _where()))
        return func(*args, **kwargs)


def _where() -> str:
    """The innermost caller that is neither torch, Triton nor this probe: file:line."""
    skip = ("/torch/", "/triton/", "step_probe.py", "contextlib.py")
    frames = [f for f in traceback.extract_stack() if not any(s in f.filename for s in skip)]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


@contextmanager
def no_host_syncs_allowed():
    """-> the list of host syncs made inside (torch.cuda.synchronize included)."""
    probe = HostSyncs()
    real = torch.cuda.synchronize

    def synchronize(*a, **k):
        probe.calls.append(("torch.cuda.synchronize()", _where()))

    torch.cuda.synchronize = synchronize
    try:
        with probe:
            yield probe.calls
    finally:
        torch.cuda.synchronize = real


# --- kernel launches -----------------------------------------------------------------------------------------

# aten ops that launch nothing on a device: views, metadata and allocation without initialisation
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "split", "split_with_sizes",
              "unbind", "chunk", "lift_fresh", "_local_scalar_dense", "set_", "resize_", "promote_types"}


class LaunchCount(TorchDispatchMode):
    """Counts what a CUDA step would launch: every aten op that computes (not views or bare allocations) outside
    device work, and every Triton launch; by decoder layer (`layer` is set by hooks) and in all."""

    def __init__(self):
        super().__init__()
        self.by_layer: Counter = Counter()
        self.ops: Counter = Counter()
        self.layer = "outside layers"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if not _DEVICE_WORK[0] and not func.is_view and name not in _NO_KERNEL:
            self.by_layer[self.layer] += 1
            self.ops[name] += 1
        return out

    def triton(self, name: str) -> None:
        self.by_layer[self.layer] += 1
        self.ops[f"triton:{name}"] += 1


@contextmanager
def count_launches(model):
    """Counts launches per decoder layer (keys: layer index, and 'outside layers') while inside."""
    counter = LaunchCount()
    real = _triton.Launch.__call__

    def launch(self, *args):
        if all(g > 0 for g in self.grid):
            counter.triton(self.name)
        with device_work():
            return real(self, *args)

    hooks = []
    for i, layer in enumerate(model.language_model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: setattr(counter, "layer", i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: setattr(counter, "layer", "outside layers")))
    _triton.Launch.__call__ = launch
    try:
        with counter:
            yield counter
    finally:
        _triton.Launch.__call__ = real
        for h in hooks:
            h.remove()
