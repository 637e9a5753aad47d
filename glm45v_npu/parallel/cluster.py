"""Rank 0's supervision of the other ranks of one model replica: starting them (unless torchrun did), sending
each step's command, and turning a rank's death or a failed collective into one error that names the rank.

What a follower does is the engine's business (engine/worker.py); this module only starts, feeds and stops it.
"""

from __future__ import annotations

import multiprocessing
import threading
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

KEEP_ALIVE = "keep-alive"  # a command followers receive and ignore


class Cluster:
    """Rank 0's side of a replica over several ranks: starts the other ranks (unless torchrun did), sends each
    step to them, and turns a rank's death or a failed collective into one error that names the rank."""

    def __init__(self, layout: Layout, device: torch.device, torchrun: bool, timeout_s: float,
                 worker: Callable[[int, Any, str], NoReturn], spec: Any):
        """worker(rank, spec, init_method) is what each follower process runs (it never returns); spec is
        pickled to it."""
        self.world, self.workers, self.broken = layout.world, [], None
        self._finalizer = None
        self._lock = threading.RLock()  # one collective at a time: a step, or a keep-alive
        self._last_send = time.monotonic()
        self._idle = threading.Event()  # set: stop the keep-alive thread
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
        self.keepalive_s = max(0.5, min(5.0, timeout_s / 4))
        threading.Thread(target=self._keep_alive, name="glm45v-keepalive", daemon=True).start()

    @contextmanager
    def collective(self) -> Iterator[None]:
        """Work that the other ranks take part in: on several ranks any failure in it ends the run."""
        with self._lock:
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
            self._last_send = time.monotonic()

    def _keep_alive(self) -> None:
        """While rank 0 is idle (a server between requests, a chat waiting for its user), followers wait in a
        broadcast that would time out after dist_timeout_s: a no-op command every few seconds keeps them, and
        finds a dead rank before the next request does."""
        while not self._idle.wait(self.keepalive_s / 2):
            if self.broken or time.monotonic() - self._last_send < self.keepalive_s:
                continue
            if self._lock.acquire(blocking=False):
                try:
                    with self.collective():
                        self.send(KEEP_ALIVE)
                except Glm45vError:
                    return
                finally:
                    self._lock.release()

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
        self._idle.set()
        with self._lock:
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
