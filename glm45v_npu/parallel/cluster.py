"""Rank 0's supervision of the other ranks of one model replica: starting them (spawned on this machine, or by
torchrun on any number of machines), sending each step's command, and turning a rank's death or a failed
collective into one error that names the rank, its node, host and pid.

Every rank registers (node, host, pid) in the process group's store and beats there every half second, so rank 0 can
tell which rank went silent wherever it runs. What a follower does is the engine's business (engine/worker.py);
this module only starts, feeds, watches and stops it.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import json
import multiprocessing
import os
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from .. import platform
from ..errors import Glm45vError
from . import layout as collectives
from .layout import Layout, free_port

KEEP_ALIVE = "keep-alive"  # a command followers receive and ignore
BEAT_S = 0.5  # each rank's heartbeat in the store
SILENT_S = 2.5  # a rank whose last beat is older than this has died
STORE_WAIT_S = 2.0  # the longest rank 0 looks at the store for a dead rank, or waits for a beat to stop
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Torchrun:
    """This process's place when torchrun started it: global rank and world, its rank and the ranks on its own
    machine (devices and CPU cores are per machine), and its node."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    node: int

    @classmethod
    def from_env(cls) -> Torchrun | None:
        """The torchrun launch, when every variable torchrun sets is there and more than one rank runs."""
        env = os.environ
        if not all(v in env for v in TORCHRUN_VARS) or int(env["WORLD_SIZE"]) <= 1:
            return None
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"]),
                   int(env.get("GROUP_RANK", env.get("NODE_RANK", "0"))))

    def check(self, tensor_parallel_size: int) -> None:
        if tensor_parallel_size != self.world:
            raise Glm45vError(f"--tensor-parallel-size {tensor_parallel_size}, but torchrun started {self.world} "
                              f"processes (WORLD_SIZE); they must be equal (rank {self.rank})")


def register(rank: int, node: int) -> None:
    """This rank's node, host and pid in the store, and a thread that beats there until leave()."""
    store = collectives.store()
    store.set(f"glm45v/rank/{rank}", json.dumps({"node": node, "host": socket.gethostname(), "pid": os.getpid()}))
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_S):
            try:
                store.set(f"glm45v/beat/{rank}", str(time.time()))
            except Exception:  # the store is gone with rank 0: the step loop reports that
                return

    store.set(f"glm45v/beat/{rank}", str(time.time()))  # there before anyone looks
    thread = threading.Thread(target=beat, name=f"glm45v-beat{rank}", daemon=True)
    thread.start()
    _beats.append((stop, thread))


def leave() -> None:
    """Stop this rank's heartbeat, then leave the process group. A beat thread still inside the store's C++ call
    when the interpreter exits, or when the group goes, is unwound by force and aborts the whole process
    (std::terminate), so it is stopped and joined first; also at exit, for a process that never called this."""
    _stop_beats()
    collectives.shutdown()


def _stop_beats() -> None:
    while _beats:
        stop, thread = _beats.pop()
        stop.set()
        thread.join(timeout=STORE_WAIT_S)


_beats: list[tuple[threading.Event, threading.Thread]] = []
atexit.register(_stop_beats)


def registry(world: int) -> dict[int, dict]:
    """Every follower's registration (node, host, pid), read once everyone has joined; rank 0 keeps it, so that
    it can name a rank even when the store went down with that rank's node."""
    store = collectives.store()
    store.set_timeout(datetime.timedelta(seconds=5))
    return {rank: json.loads(store.get(f"glm45v/rank/{rank}").decode()) for rank in range(1, world)}


def describe(rank: int, who: dict | None) -> str:
    return f"rank {rank}" + (f" (node {who['node']}, host {who['host']}, pid {who['pid']})" if who else "")


def dead_ranks(ranks: dict[int, dict], world: int, patience_s: float) -> list[str]:
    """Ranks known dead: on this host, at once by their pid; anywhere, by a heartbeat silent for SILENT_S (waited
    for up to `patience_s`, as a rank killed a moment ago still has a fresh beat). Every wait is short."""
    host = socket.gethostname()
    gone = [describe(r, w) for r, w in ranks.items() if w["host"] == host and not _alive(w["pid"])]
    deadline = time.monotonic() + patience_s
    while not gone:
        try:
            store = collectives.store()
            store.set_timeout(datetime.timedelta(seconds=STORE_WAIT_S))
            now = time.time()
            gone = [describe(r, ranks.get(r)) for r in range(1, world)
                    if now - float(store.get(f"glm45v/beat/{r}").decode()) > SILENT_S]
        except Exception:  # the store went down with its node: what the pids said is all there is
            return gone
        if gone or time.monotonic() > deadline:
            return gone
        time.sleep(BEAT_S / 2)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process with that pid: alive as far as we can tell
        return True
    return True


class Cluster:
    """Rank 0's side of a replica over several ranks: starts the other ranks (unless torchrun did), sends each
    step to them, and turns a rank's death or a failed collective into one error that names the rank."""

    def __init__(self, layout: Layout, device: torch.device, torchrun: bool, timeout_s: float,
                 worker: Callable[[int, Any, str], NoReturn], spec: Any):
        """worker(rank, spec, init_method) is what each follower process runs (it never returns); spec is
        pickled to it."""
        self.world, self.workers, self.broken = layout.world, [], None
        self.torchrun = torchrun
        self.ranks: dict[int, dict] = {}  # followers' registrations, read at the first step
        self._finalizer = None
        self._lock = threading.RLock()  # one collective at a time: a step, or a keep-alive
        self._last_send = time.monotonic()
        self._idle = threading.Event()  # set: stop the keep-alive thread
        if self.world == 1:
            return
        if collectives.initialized():  # a dropped LLM whose cycle the collector has not reached yet: end it now
            gc.collect()
        init_method = "env://" if torchrun else f"tcp://127.0.0.1:{free_port()}"
        if torchrun and layout.rank > 0:  # torchrun started this process as a follower: serve, then exit
            worker(layout.rank, spec, init_method)
        if not torchrun:
            ctx = multiprocessing.get_context("spawn")
            for rank in range(1, self.world):
                p = ctx.Process(target=worker, args=(rank, spec, init_method), name=f"glm45v-rank{rank}", daemon=True)
                p.start()
                self.workers.append(p)
        self._finalizer = weakref.finalize(self, _shutdown, self.workers, self._lock, self._idle)
        if torchrun and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._terminated)
        with self.collective():
            if device.type != "cpu":
                platform.device_module(device).set_device(device)
            collectives.init(layout, device, init_method, timeout_s)
            register(0, Torchrun.from_env().node if torchrun else 0)
        self.keepalive_s = max(0.5, min(5.0, timeout_s / 4))
        # the thread holds the cluster weakly: a dropped LLM is collected (and its finalizer ends the ranks)
        threading.Thread(target=_keep_alive, args=(weakref.ref(self), self._idle, self.keepalive_s),
                         name="glm45v-keepalive", daemon=True).start()

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
            if not self.ranks:  # everyone registered before joining the model's collectives
                self.ranks = registry(self.world)
            if any(p.exitcode is not None for p in self.workers):
                raise RuntimeError("a worker exited")
            collectives.broadcast(command)
            self._last_send = time.monotonic()

    def keep_alive(self) -> bool:
        """One no-op command if nothing was sent for a while; False once the group is broken."""
        if self.broken:
            return False
        if time.monotonic() - self._last_send >= self.keepalive_s and self._lock.acquire(blocking=False):
            try:
                with self.collective():
                    self.send(KEEP_ALIVE)
            except Glm45vError:
                return False
            finally:
                self._lock.release()
        return True

    def fail(self, error: Exception) -> NoReturn:
        """A collective failed: name the rank that died (if one did) instead of a raw backend error. Spawned
        workers are known by their exit codes; torchrun's ranks by their heartbeats in the store."""
        if self.torchrun:
            dead = dead_ranks(self.ranks, self.world, SILENT_S + 2 * BEAT_S)
            who = f"{dead[0]} died" if dead else None
        else:
            for _ in range(50):  # give a dying worker a moment to be reaped, so its exit code is known
                if any(p.exitcode is not None for p in self.workers):
                    break
                time.sleep(0.1)
            codes = [(i + 1, p.exitcode) for i, p in enumerate(self.workers) if p.exitcode is not None]
            who = f"rank {codes[0][0]} died (exit code {codes[0][1]})" if codes else None
        for p in self.workers:
            if p.is_alive():
                p.kill()
        self.broken = (f"tensor-parallel {who}; the run cannot go on" if who else
                       f"a tensor-parallel collective failed ({type(error).__name__}: {error}); the run cannot go on")
        if self._finalizer is not None:
            self._finalizer.detach()
        leave()
        raise Glm45vError(self.broken) from None

    def _terminated(self, signum, frame) -> NoReturn:
        """torchrun stops this rank when another one's node failed; say which, if it can be told, and end."""
        dead = dead_ranks(self.ranks, self.world, 0.0) if self.ranks else []
        self.broken = (f"tensor-parallel {dead[0]} died; the run cannot go on" if dead else
                       "stopped by torchrun (SIGTERM): another rank or node of the job failed")
        raise Glm45vError(self.broken)

    def close(self) -> None:
        """Stop the worker ranks and leave the process group."""
        self._idle.set()
        with self._lock:
            if self._finalizer is not None and self.broken is None:
                self._finalizer()


def _keep_alive(ref: weakref.ref, idle: threading.Event, every_s: float) -> None:
    """While rank 0 is idle (a server between requests, a chat waiting for its user), followers wait in a
    broadcast that would time out after dist_timeout_s: a no-op command every few seconds keeps them, and finds a
    dead rank before the next request does. Ends with the cluster (closed, broken or collected)."""
    while not idle.wait(every_s / 2):
        cluster = ref()
        if cluster is None or not cluster.keep_alive():
            return
        del cluster


def _shutdown(workers: list, lock: threading.RLock, idle: threading.Event) -> None:
    """Tell the followers to stop and leave the group, after any keep-alive in flight (a thread inside a
    collective at exit aborts the process)."""
    idle.set()
    with lock:
        try:
            collectives.broadcast(None)
        except Exception:  # a worker already gone: nothing to tell it
            pass
    for p in workers:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    leave()
