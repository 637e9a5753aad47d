"""The engine in one background thread, driven by step(); HTTP handlers talk to it through commands.

The engine is not thread-safe, so every call into it (add, abort, step) happens on this thread. A handler
submits a request and gets back its id and an asyncio.Queue that receives each RequestOutput (and finally None);
an abort is applied before the next step, so a client that disconnects frees its blocks within one step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import Glm45vError

log = logging.getLogger("glm45v_npu")


class Overloaded(Exception):
    """More requests wait than --max-waiting allows."""


@dataclass
class _Submit:
    request: Any
    params: Any
    enable_thinking: bool | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)


class EngineLoop:
    def __init__(self, llm, max_waiting: int | None = None, on_output=None, on_step=None):
        self.llm, self.max_waiting = llm, max_waiting
        self.on_output, self.on_step = on_output, on_step  # metrics hooks, called on the engine thread
        self.commands: queue.Queue = queue.Queue()
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.waiting = 0  # accepted, not yet running (a snapshot the handlers read)
        self.running = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="glm45v-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Abort whatever is left and end the thread."""
        self._stop.set()
        self.commands.put(None)
        self.thread.join(timeout=60)

    # --- called from the event loop ------------------------------------------------------------------------

    async def submit(self, request: Any, params: Any, enable_thinking: bool | None) -> tuple[str, asyncio.Queue]:
        if self.max_waiting is not None and self.waiting + self.commands.qsize() >= self.max_waiting:
            raise Overloaded(f"{self.waiting} requests are waiting (--max-waiting {self.max_waiting})")
        loop = asyncio.get_running_loop()
        cmd = _Submit(request, params, enable_thinking, loop, loop.create_future())
        self.commands.put(cmd)
        rid = await cmd.future
        return rid, cmd.outputs

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id))

    def abort_all(self) -> None:
        """End every request now (each stream still gets its final chunk): the end of a shutdown's grace."""
        self.commands.put(("abort_all", None))

    # --- the engine thread ---------------------------------------------------------------------------------

    def _deliver(self, request_id: str, item: Any) -> None:
        target = self.queues.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _apply(self, cmd: Any) -> None:
        if isinstance(cmd, _Submit):
            try:
                rid = self.llm.add_request(cmd.request, cmd.params, cmd.enable_thinking)
            except Exception as e:  # a bad request (or a bug while encoding it) goes back to its handler
                cmd.loop.call_soon_threadsafe(_settle, cmd.future, None, e)
                return
            self.queues[rid] = (cmd.loop, cmd.outputs)
            cmd.loop.call_soon_threadsafe(_settle, cmd.future, rid, None)
        elif isinstance(cmd, tuple) and cmd[0] == "abort":
            self.llm.abort(cmd[1])
        elif isinstance(cmd, tuple) and cmd[0] == "abort_all":
            for rid in list(self.queues):
                self.llm.abort(rid)

    def _drain(self, wait: bool) -> None:
        """Apply every queued command; when the engine is idle, first wait a moment for one."""
        try:
            cmd = self.commands.get(timeout=0.5) if wait else self.commands.get_nowait()
            while cmd is not None:  # None: stop() woke us
                self._apply(cmd)
                cmd = self.commands.get_nowait()
        except queue.Empty:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(wait=not self.llm.has_unfinished())
            if not self._stop.is_set() and self.llm.has_unfinished():
                self._step()
        for rid in list(self.queues):
            self.llm.abort(rid)
        while self.llm.has_unfinished():
            self._step()

    def _step(self) -> None:
        try:
            outs = self.llm.step()
        except Exception as e:  # the step changed nothing (see Engine.step); fail its requests, keep serving
            log.error("engine step failed: %s: %s", type(e).__name__, e)
            for rid in list(self.queues):
                self.llm.abort(rid)
                self._deliver(rid, Glm45vError(f"the engine failed on this request's step ({type(e).__name__})"))
            return
        stats = self.llm.stats()
        self.waiting, self.running = stats.waiting, stats.running
        if self.on_step:
            self.on_step(stats)
        for out in outs:
            if self.on_output:
                self.on_output(out)
            self._deliver(out.request_id, out)
            if out.finished:
                self._deliver(out.request_id, None)
                self.queues.pop(out.request_id, None)


def _settle(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
