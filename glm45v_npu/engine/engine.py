"""Engine: requests in, outputs out, one step at a time.

It owns the processor, scheduler, block manager, runner, sampler, detokenizers and stop rules. LLM, the CLI,
caption and the server use only `add_request`, `abort`, `step`, `has_unfinished`, `stats` and `close`.
A step that fails leaves every request as it was (nothing is committed before the model and the sampler are
done), so the engine stays usable; an aborted request is reported once more, finished, by the next step.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from dataclasses import dataclass

import torch

from .. import platform
from ..errors import Glm45vError
from ..inputs.processor import Processor, generation_defaults
from ..model.glm4v_moe import check_layout
from ..model.hf_config import load_config, with_num_layers
from ..model.hub import resolve_model
from ..outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ..parallel.cluster import Cluster
from ..parallel.layout import Layout, env_layout
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .memory import check_fits
from .runner import StepPlan
from .sampler import Sampled, Sampler
from .scheduler import Scheduler
from .sequence import Sequence, Status
from .worker import RankSpec, build_rank, rank_device, worker_main

log = logging.getLogger("glm45v_npu")
_request_ids = itertools.count()


@dataclass
class EngineStats:
    num_blocks: int
    free_blocks: int
    block_size: int
    prefix_cache_hit_tokens: int
    preemptions: int
    running: int
    waiting: int
    requests: int  # requests the engine still holds (unfinished, or finished and not yet reported)
    steps: int  # model steps run so far
    host_s: float  # seconds in those steps on the host: scheduling, step inputs, stop rules, detokenising
    device_s: float  # seconds from launching the model to the sampled tokens on the host


@dataclass(eq=False)
class _Completion:
    index: int  # its place among the request's n completions
    seq: Sequence
    detok: IncrementalDetokenizer
    text: str = ""  # the part of the decoded text that is safe to show (stop strings held back)
    logprobs: list[dict[int, Logprob]] | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0  # what delta outputs have reported so far
    sent_text: int = 0
    changed: bool = False


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[_Completion]
    metrics: RequestMetrics
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.seq.status is Status.FINISHED for c in self.completions)


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        path, weightless = resolve_model(config.model, config.revision, config.download_dir)
        if weightless and config.load_format != "dummy":
            raise Glm45vError(f"--model {config.model}: a built-in config has no weights; add --load-format dummy")
        self.model_config = cfg = with_num_layers(load_config(path), config.num_layers)
        torchrun = env_layout()
        world = torchrun.world if torchrun else config.tensor_parallel_size
        layout = Layout(torchrun.rank if torchrun else 0, world, config.enable_expert_parallel)
        check_layout(cfg, layout)  # a clear error before any process starts
        self.device = rank_device(platform.pick_device(config.device).type, layout.rank)
        self.dtype = platform.pick_dtype(config.dtype, self.device)
        limit = cfg.text.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise Glm45vError(f"max_model_len={config.max_model_len}: the model's context is {limit} tokens "
                              f"(max_position_embeddings in {cfg.source})")
        self.max_model_len = config.max_model_len or limit
        self.weight_bytes_per_rank = check_fits(cfg, layout, self.dtype, self.device,
                                                         config.gpu_memory_utilization)
        self.processor = Processor(path, cfg, config.max_pixels, config.limit_mm_per_prompt,
                                   config.mm_processor_kwargs)
        self.sampling_defaults = generation_defaults(path) if config.generation_config == "auto" else {}
        spec = RankSpec(config, str(path), cfg, self.dtype, self.device.type, world,
                                 max_image_patches=self.processor.max_image_patches)
        self.cluster = Cluster(layout, self.device, torchrun is not None, config.dist_timeout_s, worker_main, spec)
        with self.cluster.collective():
            _, self.runner, num_blocks, per_block = build_rank(spec, layout, self.device, progress=True)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self._requests: dict[str, _Request] = {}
        self._owner: dict[int, tuple[_Request, _Completion]] = {}
        self._dirty: dict[str, None] = {}  # requests with something to report at the next step, in order
        self._timing = [0, 0.0, 0.0]  # steps, host seconds, device seconds
        log.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB per device)", num_blocks,
                 config.block_size, self.capacity_tokens, num_blocks * per_block / 2**30)

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams with the checkpoint's generation defaults (generation_config "auto"), then overrides."""
        return SamplingParams(**{**self.sampling_defaults, **overrides})

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    # --- requests -----------------------------------------------------------------------------------------

    def add_request(self, request: str | dict, params: SamplingParams, enable_thinking: bool | None = None,
                    request_id: str | None = None) -> str:
        """Encode and queue one request; returns its id. Raises Glm45vError, and queues nothing, when the
        request is malformed or can never fit."""
        if not isinstance(params, SamplingParams):
            raise Glm45vError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        request_id = str(next(_request_ids)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise Glm45vError(f"request id {request_id!r} is already in use")
        enc = self.processor.encode(request, enable_thinking)
        n = len(enc.token_ids)
        room = min(self.max_model_len, self.capacity_tokens)
        wanted = params.max_tokens or 1
        if n + wanted > self.max_model_len:
            raise Glm45vError(f"prompt ({n} tokens) + max_tokens ({wanted}) exceeds the model's context of "
                              f"{self.max_model_len} tokens")
        if n + wanted > room:
            raise Glm45vError(f"prompt ({n} tokens) + max_tokens ({wanted}) exceeds the KV cache "
                              f"({self.capacity_tokens} tokens)")
        req = _Request(request_id, enc.prompt, list(enc.token_ids), params, [],
                       RequestMetrics(arrival_time=time.perf_counter()))
        for i in range(params.n):
            seq = Sequence(list(enc.token_ids), n, params, enc.positions, enc.delta, enc.images)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(_derived_seed(params.seed, i))
            detok = IncrementalDetokenizer(self.processor.tokenizer, params.skip_special_tokens, params.stop,
                                           params.include_stop_str_in_output)
            comp = _Completion(i, seq, detok, logprobs=[] if params.logprobs is not None else None)
            req.completions.append(comp)
            req.metrics.token_times.append([])
            self._owner[seq.seq_id] = (req, comp)
        self._requests[request_id] = req
        for comp in req.completions:
            self.scheduler.add(comp.seq)
        return request_id

    def abort(self, request_id: str, report: bool = True) -> None:
        """Stop a request wherever it is; its blocks are free at once. The next step reports it finished, unless
        report is False: then it is forgotten now."""
        req = self._requests.get(str(request_id))
        if req is None:
            return
        for comp in req.completions:
            if comp.seq.status is not Status.FINISHED:
                comp.detok.finish()
                comp.text += comp.detok.delta(final=True)
                self.scheduler.finish(comp.seq, "abort")
                comp.changed = True
        if report:
            self._dirty[req.request_id] = None
        else:
            self._dirty.pop(req.request_id, None)
            self._forget(req)

    def has_unfinished(self) -> bool:
        """Requests to run or to report, or state of finished ones that the next step clears."""
        return (self.scheduler.has_work() or bool(self._dirty) or self.scheduler.has_retired()
                or bool(self.runner.pending_drops))

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(self.blocks.num_blocks, self.blocks.num_free, self.blocks.block_size, self.blocks.hits,
                           s.preemptions, len(s.running), len(s.waiting), len(self._requests), *self._timing)

    def close(self) -> None:
        self.cluster.close()

    # --- one step -----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample, apply stop rules; -> an output for each request that progressed
        (per its SamplingParams.output_kind) and for each request that finished."""
        if self.cluster.broken:
            raise Glm45vError(self.cluster.broken)
        t0 = time.perf_counter()
        for seq_id in self.scheduler.take_retired():
            self.runner.forget(seq_id)
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_work():
                raise Glm45vError(f"the scheduler cannot place any of {len(self.scheduler.waiting)} waiting "
                                  "request(s) although nothing runs (a bug: please report it)")
            drop = self.runner.drop_only()
            if drop is not None:
                with self.cluster.collective():
                    self.cluster.send(drop)
                    self.runner.execute(drop)
                self.runner.pending_drops.difference_update(drop.drop_images)
            return self._emit()
        plan = self.runner.prepare(batch)
        t1 = time.perf_counter()
        with self.cluster.collective():
            self.cluster.send(plan.inputs)
            logits = self.runner.execute(plan.inputs)
        sampled = self._sample(plan, logits) if plan.samplers else None
        platform.synchronize(self.device)
        t2 = time.perf_counter()
        # nothing above changed a sequence; from here on the step is committed
        self.runner.commit(plan)
        now = time.perf_counter()
        for seq in batch.seqs:
            self.blocks.register(seq)
            req, _ = self._owner[seq.seq_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.num_cached_tokens = seq.num_cached
        if sampled is not None:
            for row, seq in enumerate(plan.samplers):
                self._append(seq, row, sampled, now)
        outs = self._emit()
        t3 = time.perf_counter()
        self._timing[0] += 1
        self._timing[1] += (t1 - t0) + (t3 - t2)
        self._timing[2] += t2 - t1
        return outs

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> Sampled:
        seqs = plan.samplers
        suppress = []
        for s in seqs:
            p = s.params
            early = s.num_output < p.min_tokens
            suppress.append(([] if p.ignore_eos else self.processor.eos_token_ids) + p.stop_token_ids if early else [])
        return self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs],
                            [s.token_ids for s in seqs], [s.prompt_len for s in seqs], suppress)

    def _append(self, seq: Sequence, row: int, sampled: Sampled, now: float) -> None:
        req, comp = self._owner[seq.seq_id]
        token = sampled.tokens[row]
        seq.token_ids.append(token)
        seq.logprobs.append(sampled.logprobs[row])
        req.metrics.token_times[comp.index].append(now - req.metrics.arrival_time)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        if comp.logprobs is not None:
            entry = {token: Logprob(sampled.logprobs[row], sampled.ranks[row], self._decode_one(token))}
            for rank, (tid, lp) in enumerate(sampled.top[row] or [], start=1):
                entry.setdefault(tid, Logprob(lp, rank, self._decode_one(tid)))
            comp.logprobs.append(entry)
        p = seq.params
        is_eos = not p.ignore_eos and token in self.processor.eos_token_ids
        is_stop_id = token in p.stop_token_ids
        if not (is_eos or is_stop_id):
            comp.detok.add(token)
        limit = min(p.max_tokens or self.max_model_len, self.max_model_len - seq.prompt_len)
        reason = None
        if is_eos or is_stop_id:
            reason, comp.stop_reason = "stop", token if is_stop_id else None
        elif comp.detok.stopped:
            reason, comp.stop_reason = "stop", comp.detok.stopped
        elif seq.num_output >= limit or len(seq) >= self.max_model_len:
            reason = "length"
        if reason is not None:
            comp.detok.finish()
            self.scheduler.finish(seq, reason)
        comp.text += comp.detok.delta(final=reason is not None)
        comp.changed = True
        self._dirty[req.request_id] = None

    def _decode_one(self, token: int) -> str | None:
        tok = self.processor.tokenizer
        return None if tok is None else tok.decode([token])

    def _emit(self) -> list[RequestOutput]:
        outs = []
        for rid in self._dirty:
            req = self._requests[rid]
            kind = req.params.output_kind
            done = req.finished
            if kind == "cumulative" or (kind == "final_only" and done):
                outs.append(self._output(req, delta=False))
            elif kind == "delta":
                outs.append(self._output(req, delta=True))
            for comp in req.completions:
                comp.changed = False
            if done:
                req.metrics.finished_time = time.perf_counter()
                self._forget(req)
        self._dirty.clear()
        return outs

    def _forget(self, req: _Request) -> None:
        del self._requests[req.request_id]
        for comp in req.completions:
            del self._owner[comp.seq.seq_id]

    def _output(self, req: _Request, delta: bool) -> RequestOutput:
        outputs = []
        for c in req.completions:
            if delta and not c.changed:
                continue
            seq = c.seq
            t0, x0 = (c.sent_tokens, c.sent_text) if delta else (0, 0)
            outputs.append(CompletionOutput(
                index=c.index, text=c.text[x0:], token_ids=seq.output_ids[t0:],
                cumulative_logprob=sum(seq.logprobs) if c.logprobs is not None else None,
                logprobs=c.logprobs[t0:] if c.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=c.stop_reason))
            c.sent_tokens, c.sent_text = seq.num_output, len(c.text)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs, req.finished, req.metrics,
                             req.num_cached_tokens)


def _derived_seed(seed: int, index: int) -> int:
    """Sample i of a seeded request with n > 1: sample 0 uses the seed itself, so n=1 and n>1 agree on it."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1
