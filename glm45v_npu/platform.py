"""Device, dtype and memory queries. The only module that imports torch_npu."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .errors import Glm45vError


def cache_dir() -> Path:
    """What this machine makes once and keeps: the tiny random model, the compiled CPU kernels."""
    return Path(os.environ.get("GLM45V_CACHE") or Path.home() / ".cache" / "glm45v-npu")


def cpu_share(local_rank: int = 0, local_world: int = 1) -> list[int]:
    """The cores one rank may use: the cores this process may run on (its affinity, as taskset, cgroups or a
    launcher set it) split evenly between the ranks on this machine, rank 0 first."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    per = max(1, len(allowed) // max(1, local_world))
    start = (local_rank * per) % len(allowed)
    return allowed[start : start + per]


def use_cpu_share(local_rank: int = 0, local_world: int = 1, pin: bool = True) -> int:
    """Run one torch thread per core of this rank's share and, with `pin` (a process of its own: a spawned or
    torchrun rank, not the caller's), keep the process on those cores when ranks share the machine; -> the
    thread count before. A decode step reads every weight once: more threads than cores only contend."""
    cores = cpu_share(local_rank, local_world)
    if pin and local_world > 1 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    before = torch.get_num_threads()
    torch.set_num_threads(len(cores))
    return before


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  registers the "npu" device

    return torch.npu.is_available()


def pick_device(name: str | None = None) -> torch.device:
    """npu > cuda > cpu unless told."""
    if name:
        kind = name.split(":")[0]
        if kind == "npu" and not npu_available():
            raise Glm45vError(f"--device {name}: no Ascend NPU (torch_npu) available here")
        if kind == "cuda" and not torch.cuda.is_available():
            raise Glm45vError(f"--device {name}: no CUDA device available here")
        if kind not in ("npu", "cuda", "cpu"):
            raise Glm45vError(f"--device {name}: expected npu, cuda or cpu")
        return torch.device(name)
    if npu_available():
        return torch.device("npu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "float64": torch.float64}  # float64: CPU references (the twins in float64)


def pick_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bfloat16 on accelerators, float32 on CPU, unless told."""
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in _DTYPES:
        raise Glm45vError(f"--dtype {name}: expected one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def torch_npu_module():
    """torch_npu, imported here only (kernels/npu_ops.py calls its fused ops through this)."""
    import torch_npu

    return torch_npu


class GraphAPI:
    """Capture and replay of device graphs, the same calls on CUDA (torch.cuda) and Ascend (torch.npu)."""

    def __init__(self, module):
        self.module = module
        self.Graph = module.CUDAGraph if hasattr(module, "CUDAGraph") else module.NPUGraph

    def capture(self, graph, pool=None):
        return self.module.graph(graph, pool=pool)


def graph_api(device: torch.device) -> GraphAPI:
    if device.type == "cpu":
        raise RuntimeError("no device graphs on a CPU")
    return GraphAPI(device_module(device))


def device_module(device: torch.device):
    return getattr(torch, device.type)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        device_module(device).synchronize(device)


def memory_info(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes on an accelerator, as the driver sees them (other processes included)."""
    free, total = device_module(device).mem_get_info(device)
    return free, total


def total_memory(device: torch.device) -> int:
    return memory_info(device)[1]


def allocated_memory(device: torch.device) -> int:
    """Bytes this process holds in tensors on the device."""
    return 0 if device.type == "cpu" else device_module(device).memory_allocated(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type != "cpu":
        device_module(device).reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    return 0 if device.type == "cpu" else device_module(device).max_memory_allocated(device)
