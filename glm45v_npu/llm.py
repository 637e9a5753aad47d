"""LLM: owns the processor and the engine (block manager, scheduler, runner, sampler); generate() and stream()."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import platform
from .config import load_config
from .context import ForwardContext
from .detokenizer import IncrementalDetokenizer
from .engine.block_manager import BlockManager
from .engine.runner import ModelRunner
from .engine.scheduler import Scheduler
from .engine.sequence import Sequence, Status
from .errors import Glm45vError
from .hub import resolve_model
from .model.glm4v_moe import build_model, load_model
from .model.loader import init_dummy_weights
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
    ):
        path, weightless = resolve_model(model)
        if load_format not in ("auto", "dummy"):
            raise Glm45vError(f"load_format {load_format!r}: expected 'auto' or 'dummy'")
        if weightless and load_format != "dummy":
            raise Glm45vError(f"--model {model}: a built-in config has no weights; add --load-format dummy")
        self.cfg = load_config(path)
        if num_layers is not None:
            if not 1 <= num_layers <= self.cfg.text.num_hidden_layers:
                raise Glm45vError(f"--num-layers {num_layers}: expected 1..{self.cfg.text.num_hidden_layers}")
            text = dataclasses.replace(self.cfg.text, num_hidden_layers=num_layers,
                                       first_k_dense_replace=min(self.cfg.text.first_k_dense_replace, num_layers))
            self.cfg = dataclasses.replace(self.cfg, text=text)
        self.device = platform.pick_device(device)
        self.dtype = platform.pick_dtype(dtype, self.device)
        self.processor = Processor(path, self.cfg, max_pixels=max_pixels)
        if load_format == "dummy":
            self.model = build_model(self.cfg, self.dtype, self.device)
            init_dummy_weights(self.model)
        else:
            self.model = load_model(path, self.cfg, self.dtype, self.device, progress=True)
        self.block_size = block_size or 16
        self.max_num_batched_tokens = max_num_batched_tokens
        per_block = ModelRunner.kv_bytes_per_block(self.model, self.block_size, self.dtype)
        num_blocks = self._num_blocks(per_block, kv_cache_gib, memory_fraction)
        self.max_model_len = self.cfg.text.max_position_embeddings
        self.blocks = BlockManager(num_blocks, self.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(self.model, num_blocks, self.block_size, self.device, self.dtype)
        self.sampler = Sampler()
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._seqs: dict[int, Sequence] = {}
        log.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB)", num_blocks, self.block_size,
                 num_blocks * self.block_size, num_blocks * per_block / 2**30)

    def _num_blocks(self, per_block: int, kv_cache_gib: float | None, fraction: float) -> int:
        if kv_cache_gib is not None:
            budget = kv_cache_gib * 2**30
        elif self.device.type == "cpu":
            budget = 2**28  # 256 MiB: plenty for small models; pass kv_cache_gib for more
        else:
            total = platform.total_memory(self.device)
            budget = total * fraction - self._profile_peak()
        n = int(budget // per_block)
        if n < 2:
            raise Glm45vError(f"KV cache budget {budget / 2**30:.2f} GiB holds fewer than 2 blocks; raise kv_cache_gib")
        return n

    @torch.inference_mode()
    def _profile_peak(self) -> int:
        """Device bytes at the peak of the largest step (weights + activations): one prefill of
        max_num_batched_tokens tokens through a throw-away cache just big enough for it."""
        n = min(self.max_num_batched_tokens, self.cfg.text.max_position_embeddings)
        blocks = -(-n // self.block_size)
        runner = ModelRunner(self.model, blocks, self.block_size, self.device, self.dtype)
        platform.reset_peak_memory(self.device)
        ctx = ForwardContext.build([n], [n], [list(range(blocks))], self.block_size, self.device)
        embeds = self.model.embed(torch.zeros(n, dtype=torch.long, device=self.device))
        positions = torch.arange(n, device=self.device).expand(3, -1)
        self.model.logits(self.model(embeds, positions, ctx)[-1:])
        platform.synchronize(self.device)
        peak = platform.peak_memory(self.device)
        del runner
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = torch.empty(0)
        return peak

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
        seq = Sequence(enc.token_ids, params, enc.positions, enc.delta, enc.images)
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
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        seqs, logits = self.runner.run(batch)
        for seq in batch.seqs:
            self.blocks.register(seq)
        if not seqs:
            return []
        tokens, logprobs = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs],
                                        [s.token_ids for s in seqs])
        now = time.perf_counter()
        for seq, token, lp in zip(seqs, tokens, logprobs):
            seq.output_ids.append(token)
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
        elif len(seq.output_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        else:
            return
        detok.finish()
        self.scheduler.finish(seq, reason)

    def _output(self, request_id: int, forget: bool = True) -> RequestOutput:
        seq = self._seqs[request_id]
        detok = self._detok[request_id]
        out = RequestOutput(
            request_id=request_id, prompt_token_count=seq.prompt_len, token_ids=list(seq.output_ids),
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
        return [x if isinstance(x, RequestOutput) else self._output(x) for x in ids]

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
            self.last_output = self._output(rid)

