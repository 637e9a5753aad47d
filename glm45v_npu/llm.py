"""LLM: owns the processor and the engine (block manager, scheduler, runner, sampler); generate() and stream()."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed, parallel, platform
from .config import load_config, with_num_layers
from .detokenizer import IncrementalDetokenizer
from .distributed import Layout
from .engine.block_manager import BlockManager
from .engine.scheduler import Scheduler
from .engine.sequence import Sequence, Status
from .errors import Glm45vError
from .hub import resolve_model
from .processor import Processor
from .progress import ProgressBar
from .sampling import Sampler, SamplingParams

log = logging.getLogger("glm45v_npu")


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_count: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    error: str | None = None  # set when the request was rejected at submission
    time_to_first_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # seconds since arrival, per generated token
    num_cached_tokens: int = 0


class LLM:
    def __init__(
        self,
        model: str | Path,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        block_size: int | None = None,
        kv_cache_gib: float | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 4096,
        enable_prefix_caching: bool = True,
        memory_fraction: float = 0.9,
        max_pixels: int | None = None,
        load_format: str = "auto",
        num_layers: int | None = None,
        tensor_parallel_size: int = 1,
        expert_parallel: bool = True,
        dist_timeout_s: float = 120.0,
    ):
        path, weightless = resolve_model(model)
        if load_format not in ("auto", "dummy"):
            raise Glm45vError(f"load_format {load_format!r}: expected 'auto' or 'dummy'")
        if weightless and load_format != "dummy":
            raise Glm45vError(f"--model {model}: a built-in config has no weights; add --load-format dummy")
        if tensor_parallel_size < 1:
            raise Glm45vError(f"--tensor-parallel-size {tensor_parallel_size}: must be >= 1")
        self.cfg = with_num_layers(load_config(path), num_layers)
        torchrun = distributed.env_layout()
        world = torchrun.world if torchrun else tensor_parallel_size
        layout = Layout(torchrun.rank if torchrun else 0, world, expert_parallel)
        layout.check(self.cfg)  # a clear error before any process starts
        device_type = platform.pick_device(device).type
        self.device = parallel.rank_device(device_type, layout.rank)
        self.dtype = platform.pick_dtype(dtype, self.device)
        self.weight_bytes_per_rank = parallel.check_fits(self.cfg, layout, self.dtype, self.device, memory_fraction)
        self.block_size = block_size or 16
        spec = parallel.RankSpec(str(path), self.cfg, self.dtype, device_type, load_format, self.block_size,
                                 kv_cache_gib, memory_fraction, max_num_batched_tokens, world, expert_parallel,
                                 timeout_s=dist_timeout_s)
        self.layout, self._workers, self._broken = layout, [], None
        if world > 1:
            spec.init_method = "env://" if torchrun else f"tcp://127.0.0.1:{distributed.free_port()}"
            if torchrun and layout.rank > 0:  # torchrun started this process as a follower: serve, then exit
                parallel.worker_main(layout.rank, spec)
            if not torchrun:
                self._workers = parallel.spawn_workers(spec)
            if self.device.type != "cpu":
                platform.device_module(self.device).set_device(self.device)
            try:
                distributed.init(layout, self.device, spec.init_method, dist_timeout_s)
            except Exception as e:
                self._fail(e)
        self.processor = Processor(path, self.cfg, max_pixels=max_pixels)
        try:
            self.model, self.runner, num_blocks, per_block = parallel.build_rank(spec, layout, self.device,
                                                                                progress=True)
        except Exception as e:
            if world > 1 and not isinstance(e, Glm45vError):
                self._fail(e)
            raise
        self.max_model_len = self.cfg.text.max_position_embeddings
        self.blocks = BlockManager(num_blocks, self.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.sampler = Sampler()
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._seqs: dict[int, Sequence] = {}
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, world > 1)
        log.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB per device)", num_blocks, self.block_size,
                 num_blocks * self.block_size, num_blocks * per_block / 2**30)

    def close(self) -> None:
        """Stop the worker ranks (if any) and leave the process group."""
        if self._broken is None:
            self._finalizer()

    def _fail(self, error: Exception):
        """A collective failed: name the rank that died (if one did) instead of a raw backend error."""
        for _ in range(50):  # give a dying worker a moment to be reaped, so its exit code is known
            if any(p.exitcode is not None for p in self._workers):
                break
            time.sleep(0.1)
        dead = [(i + 1, p.exitcode) for i, p in enumerate(self._workers) if p.exitcode is not None]
        for p in self._workers:
            if p.is_alive():
                p.kill()
        self._broken = (
            f"tensor-parallel rank {dead[0][0]} died (exit code {dead[0][1]}); the run cannot go on" if dead
            else f"a tensor-parallel collective failed ({type(error).__name__}: {error}); the run cannot go on"
        )
        if hasattr(self, "_finalizer"):
            self._finalizer.detach()
        distributed.shutdown()
        raise Glm45vError(self._broken) from None

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.block_size

    # --- requests -------------------------------------------------------------------------------------------

    def add_request(self, request, params: SamplingParams, enable_thinking: bool | None = None) -> int:
        """Encode and queue one request; returns its id. Raises Glm45vError when it can never fit."""
        enc = self.processor.encode(request, enable_thinking)
        total = len(enc.token_ids) + params.max_tokens
        if not enc.token_ids:
            raise Glm45vError("empty prompt")
        if total > self.max_model_len:
            raise Glm45vError(
                f"prompt ({len(enc.token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.max_model_len} tokens")
        if total > self.capacity_tokens:
            raise Glm45vError(
                f"prompt ({len(enc.token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the KV cache "
                f"({self.capacity_tokens} tokens)")
        seq = Sequence(list(enc.token_ids), len(enc.token_ids), params, enc.positions, enc.delta, enc.images)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self._detok[seq.seq_id] = IncrementalDetokenizer(self.processor.tokenizer, params.skip_special_tokens,
                                                         params.stop)
        self._seqs[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq.seq_id

    def abort(self, request_id: int) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None and seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """One engine step; returns the sequences that received a token (finished ones included)."""
        if self._broken:
            raise Glm45vError(self._broken)
        for seq_id in self.scheduler.released:
            self.runner.forget(seq_id)
        self.scheduler.released.clear()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        inputs, seqs = self.runner.prepare(batch)
        try:
            if self.layout.world > 1:
                if any(p.exitcode is not None for p in self._workers):
                    raise RuntimeError("a worker exited")
                distributed.broadcast(inputs)
            logits = self.runner.execute(inputs)
        except Glm45vError:
            raise
        except Exception as e:
            if self.layout.world > 1:
                self._fail(e)
            raise
        for seq in batch.seqs:
            self.blocks.register(seq)
        if not seqs:
            return []
        tokens, logprobs = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs],
                                        [s.token_ids for s in seqs])
        now = time.perf_counter()
        for seq, token, lp in zip(seqs, tokens, logprobs):
            seq.token_ids.append(token)
            seq.logprobs.append(lp)
            seq.token_times.append(now - seq.arrival)
            self._check_finish(seq, token)
        return seqs

    def _check_finish(self, seq: Sequence, token: int) -> None:
        p = seq.params
        detok = self._detok[seq.seq_id]
        is_stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.processor.eos_token_ids)
        if not is_stop_token:
            detok.add(token)
        if is_stop_token or detok.stopped:
            reason = "stop"
        elif seq.num_output >= p.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        else:
            return
        detok.finish()
        self.scheduler.finish(seq, reason)

    def output(self, request_id: int, forget: bool = True) -> RequestOutput:
        """The request's result so far; a finished request is forgotten once read (unless forget=False)."""
        seq = self._seqs[request_id]
        detok = self._detok[request_id]
        out = RequestOutput(
            request_id=request_id, prompt_token_count=seq.prompt_len, token_ids=seq.output_ids,
            text=detok.text, logprobs=list(seq.logprobs) if seq.params.logprobs else None,
            finish_reason=seq.finish_reason,
            time_to_first_token=seq.token_times[0] if seq.token_times else None,
            token_times=list(seq.token_times), num_cached_tokens=seq.num_cached,
        )
        if forget and seq.status is Status.FINISHED:
            del self._seqs[request_id], self._detok[request_id]
        return out

    # --- public API ----------------------------------------------------------------------------------------

    def generate(self, requests: list, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False, enable_thinking: bool | None = None) -> list[RequestOutput]:
        """All requests together with continuous batching; outputs in request order. A request that can never
        fit comes back with `error` set and finish_reason "abort"; the others go on."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(requests)
        if len(params_list) != len(requests):
            raise Glm45vError(f"generate: {len(requests)} requests but {len(params_list)} SamplingParams")
        ids: list[int | RequestOutput] = []
        for i, (req, p) in enumerate(zip(requests, params_list)):
            try:
                ids.append(self.add_request(req, p, enable_thinking))
            except Glm45vError as e:
                ids.append(RequestOutput(request_id=-1, prompt_token_count=0, finish_reason="abort",
                                         error=f"request {i}: {e}"))
        bar = ProgressBar("generating", len(requests)) if progress else None
        try:
            while self.has_unfinished():
                finished = [s for s in self.step() if s.status is Status.FINISHED]
                if bar:
                    bar.advance(len(finished))
        finally:
            if bar:
                bar.stop()
        return [x if isinstance(x, RequestOutput) else self.output(x) for x in ids]

    def stream(self, request, params: SamplingParams | None = None,
               enable_thinking: bool | None = None) -> Iterator[str]:
        """Text deltas as tokens are sampled. Closing the iterator early aborts the request."""
        rid = self.add_request(request, params or SamplingParams(), enable_thinking)
        seq, detok = self._seqs[rid], self._detok[rid]
        try:
            while seq.status is not Status.FINISHED:
                self.step()
                delta = detok.delta(final=seq.status is Status.FINISHED)
                if delta:
                    yield delta
        finally:
            self.abort(rid)
            self.last_output = self.output(rid)  # finish reason and timings of the streamed request



def _shutdown(workers: list, multi: bool) -> None:
    if multi:
        try:
            distributed.broadcast(None)
        except Exception:  # a worker already gone: nothing to tell it
            pass
        for p in workers:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        distributed.shutdown()
