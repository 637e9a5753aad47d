"""Work a request brings that would hold the interpreter lock for long (checking a JSON schema, decoding and
checking a large JSON body), run in a process of its own with a time limit. Every stream's engine steps need that
lock: a thread is not enough, a process is."""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as _Late
from typing import Any

# the checking process yields to the engine: a waking step thread goes first, and while every core is busy the check
# gets about a tenth of one (nice 19 would starve a large upload's check on a fully loaded CPU server)
NICE = 10


class TooLong(Exception):
    """The work ran past its time limit; its process was stopped and a fresh one takes the next call."""


class Apart:
    """One worker process (spawned: no fork of a process with threads), one call at a time, each within its limit."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def run(self, fn: Callable, *args: Any, timeout: float) -> Any:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=os.nice, initargs=(NICE,))
            future = self._pool.submit(fn, *args)
            try:
                return future.result(timeout=timeout)
            except _Late:
                self._stop()
                raise TooLong from None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self._pool is None:
            return
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        for process in processes:
            process.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(5)
        self._pool = None
