"""Engine: requests in, outputs out, one step at a time.

It owns the processor, scheduler, block manager, runner, sampler, detokenizers and stop rules. LLM, the CLI,
caption and the server use only `add_request` (or `encode` off the engine's thread, then `add_encoded`), `abort`,
`step`, `has_unfinished`, `stats` and `close`.

A step that fails leaves every request as it was (nothing is committed before the model and the sampler are
done). The engine then finds the request at fault instead of failing them all: the requests of the failed step
run one at a time, and one that fails twice in a row on its own is ended with an error; the others go on. An
aborted request is reported once more, finished, by the next step.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

import torch

from .. import platform
from ..errors import FieldError, Glm45vError
from ..inputs.messages import text_bytes
from ..inputs.processor import EncodedPrompt, generation_defaults
from ..outputs import Logprob, RequestMetrics, RequestOutput
from ..parallel.cluster import Cluster
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .grammar import Grammars
from .requests import Completion, Request, derived_seed
from .runner import StepPlan
from .sampler import Sampled, Sampler
from .scheduler import Scheduler
from .sequence import Sequence, Status
from .worker import build_rank, prepare, worker_main

log = logging.getLogger("glm45v_npu")
_request_ids = itertools.count()


@dataclass
class EngineStats:
    num_blocks: int
    free_blocks: int
    block_size: int
    prefix_cache_hit_tokens: int
    preemptions: int
    running: int  # sequences (a request with n > 1 has n)
    waiting: int
    requests: int  # requests the engine still holds (unfinished, or finished and not yet reported)
    running_requests: int  # requests with a sequence admitted
    waiting_requests: int  # unfinished requests with none admitted
    steps: int  # model steps run so far
    host_s: float  # seconds in those steps on the host: scheduling, step inputs, stop rules, detokenising
    device_s: float  # seconds from launching the model to the sampled tokens on the host
    grammar_s: float = 0.0  # of those, seconds filling structured-output masks on the host


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        ready = prepare(config)  # every rank checks the same: a mistake is an error on each
        spec = ready.spec
        self.model_config = spec.model
        self.device, self.dtype, self.quant_plan = ready.device, spec.dtype, spec.plan
        self.max_model_len = ready.max_model_len
        self.weight_bytes_per_rank = ready.weight_bytes
        self.processor = ready.processor
        self.sampling_defaults = generation_defaults(ready.path) if config.generation_config == "auto" else {}
        try:
            SamplingParams(**self.sampling_defaults)
        except FieldError as e:
            raise Glm45vError(f"{ready.path / 'generation_config.json'}: {e.field}={e.value!r}: {e.why}") from None
        self.cluster = Cluster(ready.layout, self.device, ready.torchrun is not None, config.dist_timeout_s,
                               worker_main, spec)
        self._restore_threads = None
        if self.device.type == "cpu":  # after the followers started: they take their shares of the same cores
            run = ready.torchrun
            before = platform.use_cpu_share(run.local_rank if run else 0, run.local_world if run else spec.world,
                                            pin=run is not None)
            # the caller's thread count comes back when the engine is closed, or dropped
            self._restore_threads = weakref.finalize(self, torch.set_num_threads, before)
        with self.cluster.collective():
            _, self.runner, num_blocks, per_block = build_rank(spec, ready.layout, self.device, progress=True)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self._requests: dict[str, Request] = {}
        self._owner: dict[int, tuple[Request, Completion]] = {}
        self._suspects: deque[Request] = deque()  # requests of a failed step, run one at a time until cleared
        self._dirty: dict[str, None] = {}  # requests with something to report at the next step, in order
        self._timing = [0, 0.0, 0.0, 0.0]  # steps, host seconds, device seconds, grammar-mask seconds
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()
        log.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB per device)", num_blocks,
                 config.block_size, self.capacity_tokens, num_blocks * per_block / 2**30)

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams with the checkpoint's generation defaults (generation_config "auto"), then overrides."""
        return SamplingParams(**{**self.sampling_defaults, **overrides})

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    # --- requests -----------------------------------------------------------------------------------------

    def encode(self, request: str | dict, params: SamplingParams, enable_thinking: bool | None = None
               ) -> EncodedPrompt:
        """Check and encode one request without touching the engine's state: the chat template, tokenizer and
        media run here, so a server calls it off the engine's thread. Raises Glm45vError naming the field."""
        if not isinstance(params, SamplingParams):
            raise Glm45vError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        vocab = self.model_config.text.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise FieldError("", "stop_token_ids", bad[0], f"outside the vocabulary (0..{vocab - 1})")
        size, where = text_bytes(request)  # a text that cannot fit is refused before it is tokenized
        if size > self.max_model_len * self.processor.max_token_bytes:
            raise FieldError("", where, f"{size} bytes of text", f"is at least {size // self.processor.max_token_bytes}"
                             f" tokens, over the model's context of {self.max_model_len}")
        enc = self.processor.encode(request, enable_thinking)
        if params.structured_outputs is not None or params.thinking_token_budget is not None:
            enc.grammar = self.grammars.prepare(params.structured_outputs, enc.token_ids)
        n, wanted = len(enc.token_ids), params.max_tokens or 1
        if n + wanted > self.max_model_len:
            raise Glm45vError(f"prompt ({n} tokens) + max_tokens ({wanted}) exceeds the model's context of "
                              f"{self.max_model_len} tokens")
        if n + wanted > self.capacity_tokens:
            raise Glm45vError(f"prompt ({n} tokens) + max_tokens ({wanted}) exceeds the KV cache "
                              f"({self.capacity_tokens} tokens)")
        return enc

    @property
    def grammars(self) -> Grammars:
        """The structured-output compiler, made at first use (xgrammar reads the whole vocabulary)."""
        with self._grammars_lock:
            if self._grammars is None:
                if self.processor.tokenizer is None:
                    raise Glm45vError(f"{self.model_config.source}: structured outputs need the model's tokenizer")
                self._grammars = Grammars(self.processor.tokenizer, self.model_config.text.vocab_size,
                                          list(self.processor.eos_token_ids))
            return self._grammars

    def add_encoded(self, enc: EncodedPrompt, params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request `encode` made; returns its id."""
        request_id = str(next(_request_ids)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise Glm45vError(f"request id {request_id!r} is already in use")
        n = len(enc.token_ids)
        req = Request(request_id, enc.prompt, list(enc.token_ids), params, [],
                      RequestMetrics(arrival_time=time.perf_counter()), image_sizes=list(enc.image_sizes))
        for i in range(params.n):
            seq = Sequence(list(enc.token_ids), n, params, enc.positions, enc.delta, enc.images, request=request_id)
            if enc.grammar is not None:
                seq.grammar = self.grammars.state(enc.grammar, self._limit(n, params), params)
            if params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None] * n
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(derived_seed(params.seed, i))
            detok = IncrementalDetokenizer(self.processor.tokenizer, params.skip_special_tokens, params.stop,
                                           params.include_stop_str_in_output)
            comp = Completion(i, seq, detok, logprobs=[] if params.logprobs is not None else None)
            req.completions.append(comp)
            req.metrics.token_times.append([])
            self._owner[seq.seq_id] = (req, comp)
        self._requests[request_id] = req
        for comp in req.completions:
            self.scheduler.add(comp.seq)
        return request_id

    def add_request(self, request: str | dict, params: SamplingParams, enable_thinking: bool | None = None,
                    request_id: str | None = None) -> str:
        """Encode and queue one request; returns its id. Raises Glm45vError, and queues nothing, when the
        request is malformed or can never fit."""
        return self.add_encoded(self.encode(request, params, enable_thinking), params, request_id)

    def abort(self, request_id: str, report: bool = True, error: str | None = None) -> None:
        """Stop a request wherever it is; its blocks are free at once. The next step reports it finished (with
        `error` when the engine ended it), unless report is False: then it is forgotten now."""
        req = self._requests.get(str(request_id))
        if req is None:
            return
        req.error = req.error or error
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
        live = [r for r in self._requests.values() if not r.finished]
        running = sum(r.running for r in live)
        return EngineStats(self.blocks.num_blocks, self.blocks.num_free, self.blocks.block_size, self.blocks.hits,
                           s.preemptions, len(s.running), len(s.waiting), len(self._requests), running,
                           len(live) - running, *self._timing)

    def close(self) -> None:
        self.cluster.close()
        if self._restore_threads is not None:
            self._restore_threads()

    # --- one step -----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample, apply stop rules; -> an output for each request that progressed
        (per its SamplingParams.output_kind) and for each request that finished."""
        if self.cluster.broken:
            raise Glm45vError(self.cluster.broken)
        t0 = time.perf_counter()
        for seq_id in self.scheduler.take_retired():
            self.runner.forget(seq_id)
        suspect = self._suspect()
        batch = self.scheduler.schedule(None if suspect is None else {c.seq for c in suspect.completions})
        if not batch.seqs:
            return self._idle_step(suspect)
        plan = self.runner.prepare(batch)
        t1 = time.perf_counter()
        try:
            with self.cluster.collective():
                self.cluster.send(plan.inputs)
                logits = self.runner.execute(plan.inputs)
            sampled = self._sample(plan, logits[: len(plan.samplers)]) if plan.samplers else None
            prompt = self._prompt_logprobs(plan, logits[len(plan.samplers) :]) if plan.prompt_spans else None
            platform.synchronize(self.device)
        except Exception as e:  # nothing is committed: find the request at fault, keep the others
            if self.cluster.broken:
                raise
            return self._failed(batch, e)
        t2 = time.perf_counter()
        # nothing above changed a sequence; from here on the step is committed
        self.runner.commit(plan)
        if suspect is not None:
            suspect.strikes = 0
            self._suspects.popleft()
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
        if prompt is not None:
            self._record_prompt_logprobs(plan, *prompt)
        outs = self._emit()
        t3 = time.perf_counter()
        self._timing[0] += 1
        self._timing[1] += (t1 - t0) + (t3 - t2)
        self._timing[2] += t2 - t1
        return outs

    def _suspect(self) -> Request | None:
        """The request the next step runs alone, while a failed step's requests are being tried one by one."""
        while self._suspects and self._suspects[0].finished:
            self._suspects.popleft()
        return self._suspects[0] if self._suspects else None

    def _idle_step(self, suspect: Request | None) -> list[RequestOutput]:
        """Nothing to compute: drop vision outputs of retired sequences on every rank; end a request that can
        never be placed (nothing runs, so nothing will ever free blocks for it)."""
        if suspect is not None:  # it could not be placed on its own now: it is not at fault
            self._suspects.popleft()
        elif self.scheduler.waiting and not self.scheduler.running:
            seq = self.scheduler.waiting[0]
            req, _ = self._owner[seq.seq_id]
            log.error("request %s cannot be placed: %d tokens need %d blocks, the cache has %d", req.request_id,
                      len(seq), self.blocks.blocks_needed(seq, len(seq)), self.blocks.num_blocks)
            self.abort(req.request_id, error=f"the request ({len(seq)} tokens) no longer fits the KV cache "
                                             f"({self.capacity_tokens} tokens)")
        drop = self.runner.drop_only()
        if drop is not None:
            with self.cluster.collective():
                self.cluster.send(drop)
                self.runner.execute(drop)
            self.runner.pending_drops.difference_update(drop.drop_images)
        return self._emit()

    def _failed(self, batch, error: Exception) -> list[RequestOutput]:
        """A step failed and changed nothing. With several requests in it, they run one at a time from now on;
        a request that fails twice in a row on its own is ended with the error, and the others go on."""
        why = f"{type(error).__name__}: {error}"
        reqs = list(dict.fromkeys(self._owner[s.seq_id][0] for s in batch.seqs))
        if len(reqs) > 1:
            log.warning("a step of %d requests failed (%s); running them one at a time", len(reqs), why)
            self._suspects = deque(reqs)
            return self._emit()
        req = reqs[0]
        req.strikes += 1
        if req.strikes < 2:
            log.warning("a step of request %s failed (%s); retrying it on its own", req.request_id, why)
            if not self._suspects or self._suspects[0] is not req:
                self._suspects.appendleft(req)
            return self._emit()
        log.error("request %s failed twice on its own (%s); ending it", req.request_id, why)
        if self._suspects and self._suspects[0] is req:
            self._suspects.popleft()
        self.abort(req.request_id, error=f"the engine failed on this request ({why})")
        return self._emit()

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> Sampled:
        seqs = plan.samplers
        allowed = None
        if any(s.grammar is not None for s in seqs):  # host work while the device computes the logits
            t = time.perf_counter()
            allowed = self.grammars.masks([s.grammar for s in seqs], [s.output_ids for s in seqs])
            self._timing[3] += time.perf_counter() - t
        suppress = []
        for s in seqs:
            p = s.params
            early = s.num_output < p.min_tokens and not (s.grammar is not None and s.grammar.active)  # it decides
            suppress.append(([] if p.ignore_eos else self.processor.eos_token_ids) + p.stop_token_ids if early else [])
        return self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs],
                            [s.token_ids for s in seqs], [s.prompt_len for s in seqs], suppress, allowed)

    def _prompt_logprobs(self, plan: StepPlan, logits: torch.Tensor) -> tuple:
        """The logprob and rank of each asked prompt position's next token, and the top N, computed on the device
        and brought to the host once (prefill steps of requests that ask for them only)."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        targets = [t for seq, start, count in plan.prompt_spans for t in seq.token_ids[start + 1 : start + 1 + count]]
        chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0]
        ranks = (lp > chosen[:, None]).sum(1) + 1
        top = lp.topk(max(seq.params.prompt_logprobs for seq, _, _ in plan.prompt_spans), dim=-1)
        return targets, chosen.tolist(), ranks.tolist(), top.values.tolist(), top.indices.tolist()

    def _record_prompt_logprobs(self, plan: StepPlan, targets, chosen, ranks, top_values, top_ids) -> None:
        rows = [(seq, start + 1 + k) for seq, start, count in plan.prompt_spans for k in range(count)]
        ids = sorted(set(targets).union(*(top[:seq.params.prompt_logprobs] for (seq, _), top in zip(rows, top_ids))))
        text = dict(zip(ids, self._decode_many(ids)))  # one tokenizer call for the step
        for row, (seq, at) in enumerate(rows):
            n = seq.params.prompt_logprobs
            entry = {targets[row]: Logprob(chosen[row], ranks[row], text[targets[row]])}
            for rank, (value, tid) in enumerate(zip(top_values[row][:n], top_ids[row][:n]), start=1):
                entry.setdefault(tid, Logprob(value, rank, text[tid]))
            seq.prompt_logprobs[at] = entry  # by position: a recomputed prompt writes it again

    def _append(self, seq: Sequence, row: int, sampled: Sampled, now: float) -> None:
        req, comp = self._owner[seq.seq_id]
        token = sampled.tokens[row]
        seq.token_ids.append(token)
        seq.logprobs.append(sampled.logprobs[row])
        req.metrics.token_times[comp.index].append(now - req.metrics.arrival_time)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        if comp.logprobs is not None:
            top = sampled.top[row] or []
            text = self._decode_many([token] + [tid for tid, _ in top])  # one tokenizer call per row, not 1 + N
            entry = {token: Logprob(sampled.logprobs[row], sampled.ranks[row], text[0])}
            for rank, ((tid, lp), tid_text) in enumerate(zip(top, text[1:]), start=1):
                entry.setdefault(tid, Logprob(lp, rank, tid_text))
            comp.logprobs.append(entry)
        p = seq.params
        is_eos = not p.ignore_eos and token in self.processor.eos_token_ids
        is_stop_id = token in p.stop_token_ids
        if not (is_eos or is_stop_id):
            comp.detok.add(token)
        limit = self._limit(seq.prompt_len, p)
        reason = None
        if is_eos or is_stop_id:
            reason, comp.stop_reason = "stop", token if is_stop_id else None
        elif comp.detok.stopped:
            reason, comp.stop_reason = "stop", comp.detok.stopped
        elif seq.num_output >= limit or len(seq) >= self.max_model_len:
            reason = "length"
        if seq.grammar is not None and reason is None:
            if not seq.grammar.advance(seq.output_ids):
                req.error = seq.grammar.error or f"structured output: token {token} is outside the grammar"
                reason = "abort"
            elif seq.grammar.terminated:  # complete: its stop token was taken (also with ignore_eos)
                reason = "stop"
        if reason is not None:
            comp.detok.finish()
            self.scheduler.finish(seq, reason)
        comp.text += comp.detok.delta(final=reason is not None)
        comp.changed = True
        self._dirty[req.request_id] = None

    def _limit(self, prompt_len: int, p: SamplingParams) -> int:
        """The most tokens a sequence may write: max_tokens, within the context and the whole cache."""
        return min(p.max_tokens or self.max_model_len, self.max_model_len - prompt_len,
                   self.capacity_tokens - prompt_len)

    def _decode_many(self, tokens: list[int]) -> list[str | None]:
        """Each token's text on its own (one tokenizer call for all of them)."""
        tok = self.processor.tokenizer
        return [None] * len(tokens) if tok is None else tok.batch_decode([[t] for t in tokens])

    def _emit(self) -> list[RequestOutput]:
        outs = []
        for rid in self._dirty:
            req = self._requests[rid]
            kind = req.params.output_kind
            done = req.finished
            if kind == "cumulative" or (kind == "final_only" and done):
                outs.append(req.output(delta=False))
            elif kind == "delta":
                outs.append(req.output(delta=True))
            for comp in req.completions:
                comp.changed = False
            if done:
                req.metrics.finished_time = time.perf_counter()
                self._forget(req)
        self._dirty.clear()
        return outs

    def _forget(self, req: Request) -> None:
        del self._requests[req.request_id]
        for comp in req.completions:
            del self._owner[comp.seq.seq_id]
