"""The engine in one background thread, driven by step(); HTTP handlers talk to it through commands.

The engine is not thread-safe, so every call that changes it (add, abort, step) happens on this thread. What a
request needs before the engine sees it (the chat template, tokenizing, decoding and resizing its media) runs in
a small pool of worker threads instead (`Engine.encode` touches no engine state), so a large image never pauses
the other streams. A handler submits a request and gets back its id and an asyncio.Queue that receives each
RequestOutput (and finally None); an abort is applied before the next step, so a client that disconnects frees
its blocks within one step. When the engine cannot go on (a rank died), every request gets one error, new ones
are refused with 503 and /health says so.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import Glm45vError
from ..inputs.media import CANCEL

log = logging.getLogger("glm45v_npu")


# Outputs a request may have waiting for its client (README: "Limits"): one that reads nothing (a stream left
# open and unread) is ended past this, so it holds neither memory nor a running slot.
MAX_QUEUED_OUTPUTS = 512


class Overloaded(Exception):
    """More requests wait than --max-waiting allows."""


class Unavailable(Exception):
    """The engine cannot serve any more (a rank died, a collective failed)."""


@dataclass
class _Add:
    encoded: Any
    params: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)


class EngineLoop:
    def __init__(self, llm, max_waiting: int | None = None, on_output=None, on_step=None,
                 media_workers: int | None = None):
        self.llm, self.max_waiting = llm, max_waiting
        self.on_output, self.on_step = on_output, on_step  # metrics hooks, called on the engine thread
        self.commands: queue.Queue = queue.Queue()
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.pool = ThreadPoolExecutor(max_workers=media_workers or min(4, os.cpu_count() or 1),
                                       thread_name_prefix="glm45v-media", initializer=_background)
        # requests without media have a lane of their own: they never queue behind other requests' images
        self.text_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm45v-text", initializer=_background)
        self.preparing = 0  # requests being encoded in the pool (read and written on the event loop)
        self.encoding: set[threading.Event] = set()  # their cancel events: a stop sets them all
        self.dropped: set[str] = set()  # requests ended because their client stopped reading
        self.waiting = 0  # requests accepted and not yet running (a snapshot the handlers read)
        self.running = 0
        self.broken: str | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="glm45v-engine", daemon=True)

    def start(self) -> None:
        engine = self.llm.engine
        engine.processor.warm()
        if engine.processor.tokenizer is not None:  # the grammar compiler reads the vocabulary: not on a request
            engine.grammars  # noqa: B018
        self.thread.start()

    def stop(self) -> None:
        """Abort whatever is left and end the thread."""
        self._stop.set()
        for cancel in list(self.encoding):  # media work in the pool stops at its next frame
            cancel.set()
        self.commands.put(None)
        self.thread.join(timeout=60)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.text_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def healthy(self) -> bool:
        return self.broken is None and self.thread.is_alive()

    # --- called from the event loop ------------------------------------------------------------------------

    async def submit(self, request: Any, params: Any, enable_thinking: bool | None = None,
                     cancel: threading.Event | None = None) -> tuple[str, asyncio.Queue]:
        """Encode the request in the media pool, then queue it on the engine thread. Glm45vError: the request is
        at fault (or was cancelled: `cancel` set, or the server stopping, ends its media work between frames);
        Overloaded and Unavailable: the server is."""
        if self.broken is not None:
            raise Unavailable(self.broken)
        if self.max_waiting is not None and self.waiting + self.preparing >= self.max_waiting:
            raise Overloaded(f"{self.waiting + self.preparing} requests are waiting (--max-waiting "
                             f"{self.max_waiting})")
        loop = asyncio.get_running_loop()
        cancel = cancel or threading.Event()
        self.encoding.add(cancel)
        self.preparing += 1
        try:
            context = contextvars.copy_context()
            context.run(CANCEL.set, cancel)
            pool = self.pool if has_media(request) else self.text_pool
            encoded = await loop.run_in_executor(pool, context.run, self.llm.engine.encode, request, params,
                                                 enable_thinking)
        finally:
            self.preparing -= 1
            self.encoding.discard(cancel)
        cmd = _Add(encoded, params, loop, loop.create_future())
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
            if q.qsize() > MAX_QUEUED_OUTPUTS and request_id not in self.dropped:  # its client does not read
                self.dropped.add(request_id)
                self.llm.engine.abort(request_id, error=f"the client read none of its last {MAX_QUEUED_OUTPUTS} "
                                      "outputs; the request was ended to free its slot")
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _apply(self, cmd: Any) -> None:
        if isinstance(cmd, _Add):
            try:
                if self.broken is not None:
                    raise Unavailable(self.broken)
                rid = self.llm.engine.add_encoded(cmd.encoded, cmd.params)
            except Exception as e:  # goes back to its handler
                cmd.loop.call_soon_threadsafe(_settle, cmd.future, None, e)
                return
            self.queues[rid] = (cmd.loop, cmd.outputs)
            self.waiting += 1
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
            self._drain(wait=self.broken is not None or not self.llm.has_unfinished())
            if not self._stop.is_set() and self.broken is None and self.llm.has_unfinished():
                self._step()
        for rid in list(self.queues):
            self.llm.abort(rid)
        while self.broken is None and self.llm.has_unfinished():
            self._step()

    def _step(self) -> None:
        try:
            outs = self.llm.step()
        except Exception as e:  # the engine isolates a request's own failures, so this one is everyone's
            self.broken = str(e) if isinstance(e, Glm45vError) else f"the engine failed ({type(e).__name__}: {e})"
            log.error("engine cannot go on: %s", self.broken)
            for rid in list(self.queues):
                self._deliver(rid, Glm45vError(self.broken))
            self.queues.clear()
            self.waiting = self.running = 0
            return
        stats = self.llm.stats()
        self.waiting, self.running = stats.waiting_requests, stats.running_requests
        if self.on_step:
            self.on_step(stats)
        for out in outs:
            if self.on_output:
                self.on_output(out)
            self._deliver(out.request_id, out)
            if out.finished:
                self._deliver(out.request_id, None)
                self.queues.pop(out.request_id, None)
                self.dropped.discard(out.request_id)


def _background() -> None:
    """A pool thread yields the cores to the engine's threads: a grammar compile or a video decode that competes
    with a step for a core would slow every stream's tokens (on Linux, a lower priority for this thread)."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except OSError:
            pass


def has_media(request: Any) -> bool:
    """Whether a request carries an image or a video (a content part that is not text, or media beside it)."""
    if not isinstance(request, dict):
        return False
    if request.get("images") or request.get("videos") or request.get("multi_modal_data"):
        return True
    for m in request.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") not in ("text", None)
                                             for p in content):
            return True
    return False


def _settle(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
