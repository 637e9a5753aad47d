"""Rank 0's supervision of the other ranks of one model replica: starting them (unless torchrun did), sending
each step's command, and turning a rank's death or a failed collective into one error that names the rank.

What a follower does is the engine's business (engine/worker.py); this module only starts, feeds and stops it.
"""

from __future__ import annotations

import multiprocessing
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import torch

from .. import platform
from ..errors import Glm45vError
from . import layout as collectives
from .layout import Layout, free_port


class Cluster:
    """Rank 0's side of a replica over several ranks: starts the other ranks (unless torchrun did), sends each
    step to them, and turns a rank's death or a failed collective into one error that names the rank."""

    def __init__(self, layout: Layout, device: torch.device, torchrun: bool, timeout_s: float,
                 worker: Callable[[int, Any, str], NoReturn], spec: Any):
        """worker(rank, spec, init_method) is what each follower process runs (it never returns); spec is
        pickled to it."""
        self.world, self.workers, self.broken = layout.world, [], None
        self._finalizer = None
        if self.world == 1:
            return
        init_method = "env://" if torchrun else f"tcp://127.0.0.1:{free_port()}"
        if torchrun and layout.rank > 0:  # torchrun started this process as a follower: serve, then exit
            worker(layout.rank, spec, init_method)
        if not torchrun:
            ctx = multiprocessing.get_context("spawn")
            for rank in range(1, self.world):
                p = ctx.Process(target=worker, args=(rank, spec, init_method), name=f"glm45v-rank{rank}", daemon=True)
                p.start()
                self.workers.append(p)
        self._finalizer = weakref.finalize(self, _shutdown, self.workers)
        with self.collective():
            if device.type != "cpu":
                platform.device_module(device).set_device(device)
            collectives.init(layout, device, init_method, timeout_s)

    @contextmanager
    def collective(self) -> Iterator[None]:
        """Work that the other ranks take part in: on several ranks any failure in it ends the run."""
        if self.broken:
            raise Glm45vError(self.broken)
        try:
            yield
        except Glm45vError:
            raise
        except Exception as e:
            if self.world > 1:
                self.fail(e)
            raise

    def send(self, command: Any) -> None:
        """One step's command to every follower (pickled; None tells them to stop)."""
        if self.world > 1:
            if any(p.exitcode is not None for p in self.workers):
                raise RuntimeError("a worker exited")
            collectives.broadcast(command)

    def fail(self, error: Exception) -> NoReturn:
        """A collective failed: name the rank that died (if one did) instead of a raw backend error."""
        for _ in range(50):  # give a dying worker a moment to be reaped, so its exit code is known
            if any(p.exitcode is not None for p in self.workers):
                break
            time.sleep(0.1)
        dead = [(i + 1, p.exitcode) for i, p in enumerate(self.workers) if p.exitcode is not None]
        for p in self.workers:
            if p.is_alive():
                p.kill()
        self.broken = (
            f"tensor-parallel rank {dead[0][0]} died (exit code {dead[0][1]}); the run cannot go on" if dead
            else f"a tensor-parallel collective failed ({type(error).__name__}: {error}); the run cannot go on"
        )
        if self._finalizer is not None:
            self._finalizer.detach()
        collectives.shutdown()
        raise Glm45vError(self.broken) from None

    def close(self) -> None:
        """Stop the worker ranks and leave the process group."""
        if self._finalizer is not None and self.broken is None:
            self._finalizer()


def _shutdown(workers: list) -> None:
    try:
        collectives.broadcast(None)
    except Exception:  # a worker already gone: nothing to tell it
        pass
    for p in workers:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    collectives.shutdown()
