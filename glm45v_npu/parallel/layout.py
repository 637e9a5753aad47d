"""Tensor / expert parallel layout and the few collectives the model needs (no-ops on one device).

Layout: attention heads split across ranks (KV heads replicated when ranks outnumber them), dense MLP and shared
expert column/row parallel, routed experts either expert-parallel (each rank owns E/N whole experts) or tensor-
parallel (each rank owns a slice of every expert), vocab-parallel embedding and lm_head, vision tower replicated.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import Glm45vError


@dataclass(frozen=True)
class Layout:
    rank: int = 0
    world: int = 1
    expert_parallel: bool = True  # False: tensor-parallel experts

    def even(self, n: int, what: str, source: str = "config") -> tuple[int, int]:
        """This rank's [start, start + count) of n items split evenly; a clear error when n does not divide."""
        if n % self.world:
            raise Glm45vError(f"{source}: {what} ({n}) is not divisible by --tensor-parallel-size {self.world}")
        count = n // self.world
        return self.rank * count, count

    def kv_heads(self, num_kv: int, source: str) -> tuple[int, int]:
        """KV heads of this rank: an even split, or one replicated head when ranks outnumber the KV heads."""
        if num_kv >= self.world:
            return self.even(num_kv, "num_key_value_heads", source)
        if self.world % num_kv:
            raise Glm45vError(f"{source}: --tensor-parallel-size {self.world} is not a multiple of "
                              f"num_key_value_heads ({num_kv}), so KV heads cannot be replicated evenly")
        return self.rank // (self.world // num_kv), 1

    def vocab(self, vocab: int) -> tuple[int, int]:
        """Vocab rows of this rank, padded so every rank holds the same count."""
        per = -(-vocab // self.world)
        return self.rank * per, per


SINGLE = Layout()
_control: dist.ProcessGroup | None = None  # gloo group for host-side step commands


def backend_for(device: torch.device) -> str:
    return {"npu": "hccl", "cuda": "nccl"}.get(device.type, "gloo")


def init(layout: Layout, device: torch.device, init_method: str, timeout_s: float) -> None:
    """Join the process group; collectives that wait longer than timeout_s fail instead of hanging."""
    global _control
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=layout.rank,
                            world_size=layout.world, timeout=timeout)
    _control = dist.new_group(backend="gloo", timeout=timeout) if backend_for(device) != "gloo" else None


def initialized() -> bool:
    return dist.is_initialized()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(x)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise max over the ranks (a token's activation range across the shards of its row)."""
    if active():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_reduce_min(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_control)
    return int(t)


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along the last dimension (vocab-parallel logits)."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast(obj):
    """Rank 0's object on every rank (step commands; pickled over the gloo control group)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def is_comm_error(e: Exception) -> bool:
    """A failure of the process group itself (a peer gone, a timeout), not of the work in a step."""
    return isinstance(e, (dist.DistBackendError, dist.DistNetworkError, ConnectionError, TimeoutError)) or (
        isinstance(e, RuntimeError) and any(w in str(e) for w in ("Connection", "Timed out", "timed out", "closed")))


def store() -> dist.Store:
    """The process group's key-value store (torchrun's, or the tcp:// one rank 0 hosts)."""
    return dist.distributed_c10d._get_default_store()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
