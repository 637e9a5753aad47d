"""Structured outputs: a request's grammar compiled by xgrammar once (cached by its text), one matcher per
sequence, and each step the mask of the tokens its matcher allows applied to the logits before sampling.

Two repairs over xgrammar 0.2.9's JSON-schema grammar, both measured on a random model at temperature 1: a string
with maxLength let raw control characters through, and every string rule let the UTF-8 bytes of surrogates
through; both made replies `json.loads` refuses. Its grammar text is compiled again with one string-character rule
(not a control character, quote, backslash or surrogate; or a JSON escape). No free whitespace (vLLM's
`disable_any_whitespace`; xgrammar still writes ", " and ": ") unless a request asks otherwise: free whitespace
about doubles a reply.

Reasoning: where a prompt leaves the model free to think (its last assistant turn has no `</think>`), the first
token is `<think>` or the grammar's own: a model that does not open `<think>` is constrained from its first token
(nothing it writes before the constrained part can reach a tool call's arguments). Inside `<think>` the reasoning
is free but cannot stop (stop tokens are masked), and `</think>` is forced when the request's thinking budget is
spent or when the tokens left come down to what the answer keeps: its shortest length (`Grammar.reserve`,
estimated from the schema) and at least half of what the sequence may write, up to ANSWER_TOKENS; then the
grammar takes over. A request with a thinking budget and no grammar gets only the forced `</think>`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FieldError
from ..sampling_params import StructuredOutputsParams

_PLAIN = "glm45v_plain"
_CHAR = "glm45v_char"
_RULES = (f'\n{_PLAIN} ::= [ !#-\\[\\]-\\ud7ff\\ue000-\\U0010ffff]'
          f'\n{_CHAR} ::= {_PLAIN} | "\\\\" ([\\"\\\\/bfnrt] | "u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9])')
# the character classes xgrammar writes for string characters: free strings (escapes beside them) and length-bound
# strings (no escapes at all)
_FREE_CLASS, _BOUND_CLASS = '[^\\0-\\x1f\\"\\\\\\r\\n]', '[^\\"\\\\\\r\\n]'
# Bounds (README: "Limits"): compiled grammars are kept up to this many bytes in all (least recently used go
# first), one grammar may take at most a quarter of it, and a row's mask may take this long on one step before
# its request ends with an error (a grammar the size checks let through can still be ambiguous enough to cost
# seconds per token; every other stream waits for the step).
CACHE_BYTES = 256 * 2**20
MASK_BUDGET_S = 0.05
RESERVE_TOKENS = 16  # what a regex or EBNF answer is given at least, when its shortest length is not estimated
# A constrained answer keeps at least its shortest length and at most half the tokens a sequence may write, up to
# this many: reasoning cut just short of the shortest answer leaves a model no room for a real one
ANSWER_TOKENS = 1024


@dataclass(frozen=True)
class Grammar:
    """A request's compiled grammar (None: a thinking budget alone), where its prompt leaves the model's reasoning
    ("none": the answer starts at once; "may_open": the model may open <think> first; "inside": the prompt left
    it thinking), and the tokens the constrained answer needs at least."""

    compiled: Any
    reasoning: str
    reserve: int = 0


class GrammarState:
    """One sequence's matcher and reasoning rules. It follows the sequence's output tokens (from the answer's start
    on): `advance` feeds what it has not seen, and a matcher that is ahead of them is rebuilt from them, so a
    sequence that was preempted or re-run is matched from its tokens, never from history."""

    def __init__(self, grammar: Grammar, marks: tuple[int | None, int | None], stops: list[int], limit: int,
                 budget: int | None):
        import xgrammar as xgr

        self.grammar = grammar
        self.think_open, self.reasoning_end = marks
        self.stops, self.limit, self.budget = stops, limit, budget
        self.matcher = None if grammar.compiled is None else xgr.GrammarMatcher(grammar.compiled)
        self.reserve = max(grammar.reserve, min(limit // 2, ANSWER_TOKENS))  # tokens kept for the answer
        self.begin: int | None = 0 if grammar.reasoning == "none" else None
        self.accepted = 0
        self.failed = False
        self.error: str | None = None  # why it failed, when not for a token outside the grammar

    def fail(self, why: str) -> None:
        self.failed, self.error = True, why

    @property
    def active(self) -> bool:
        return self.begin is not None and self.matcher is not None and not self.failed and \
            not self.matcher.is_terminated()

    @property
    def terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_terminated()

    def advance(self, output_ids: list[int]) -> bool:
        """Feed the output tokens the matcher has not seen; False when one is not allowed or the grammar failed
        (the sequence must end)."""
        if self.error is not None:
            return False
        if self.begin is None:
            if self.reasoning_end in output_ids:
                self.begin = output_ids.index(self.reasoning_end) + 1
            elif self.grammar.reasoning == "may_open" and output_ids and output_ids[0] != self.think_open:
                self.begin = 0
            else:
                return True
        if self.matcher is None:
            return True
        todo = output_ids[self.begin :]
        if self.accepted > len(todo):
            self.matcher.reset()
            self.accepted = 0
        for token in todo[self.accepted :]:
            if self.matcher.is_terminated() or not self.matcher.accept_token(token):
                self.failed = True
                return False
            self.accepted += 1
        return True

    def rule(self, output_ids: list[int]) -> str | None:
        """What this step's mask does for the row: "grammar", "open" (the grammar's first tokens or <think>),
        "think" (free but for stop tokens), "close" (</think> only), or None (no mask)."""
        if self.begin is not None:
            return "grammar" if self.active else None
        if self.grammar.reasoning == "may_open" and not output_ids:
            return "open" if self.matcher is not None or self.budget == 0 else None
        spent = len(output_ids) - (1 if self.grammar.reasoning == "may_open" else 0)
        if self.budget is not None and spent >= self.budget:
            return "close"
        if self.matcher is None:
            return None
        return "close" if self.limit - len(output_ids) - 1 <= self.reserve else "think"

    def fill(self, bitmask: torch.Tensor, row: int, rule: str) -> None:
        if rule in ("grammar", "open") and self.matcher is not None:
            self.matcher.fill_next_token_bitmask(bitmask, row)
        if rule == "open" and self.think_open is not None:
            may_think = self.budget != 0 and self.limit - 2 > self.reserve
            _set_bit(bitmask, row, self.think_open, may_think)
        elif rule == "think":
            for token in self.stops:
                _set_bit(bitmask, row, token, False)
        elif rule == "close":
            bitmask[row] = 0
            _set_bit(bitmask, row, self.reasoning_end, True)


def _set_bit(bitmask: torch.Tensor, row: int, token: int, on: bool) -> None:
    word, bit = divmod(token, 32)
    if word >= bitmask.shape[1]:
        return
    value = 1 << bit
    value = value - (1 << 32) if value >= 1 << 31 else value  # int32 words
    bitmask[row, word] = (bitmask[row, word] | value) if on else (bitmask[row, word] & ~value)


class Grammars:
    """The compiler for one tokenizer and vocabulary; safe to call from encoding threads."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        import xgrammar as xgr

        base = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        vocab = [""] * vocab_size  # added tokens (think, box, tool and turn markers) are never grammar text
        added = set(tokenizer.get_added_vocab())
        for token, i in tokenizer.get_vocab().items():
            if i < vocab_size and token not in added:
                vocab[i] = token
        info = xgr.TokenizerInfo(vocab, base.vocab_type, vocab_size=vocab_size, stop_token_ids=stop_ids,
                                 add_prefix_space=base.add_prefix_space)
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.reasoning_end = _token_id(tokenizer, "</think>")
        self.think_open = _token_id(tokenizer, "<think>")
        self.stop_ids = list(stop_ids)
        self.assistant = _token_id(tokenizer, "<|assistant|>")
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()

    def prepare(self, spec: StructuredOutputsParams | None, prompt_ids: list[int]) -> Grammar:
        """Compile (or find) the request's grammar (none: a thinking budget alone); raises FieldError naming the
        field when xgrammar refuses it."""
        if spec is None:
            return Grammar(None, self._reasoning(prompt_ids))
        key = json.dumps([spec.kind, spec.value, spec.disable_any_whitespace], sort_keys=True)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
        if compiled is None:
            compiled = self._compile(spec)
            size = compiled.memory_size_bytes
            if size > CACHE_BYTES // 4:
                raise FieldError("", spec.origin, _short(spec.value), f"compiles to {size / 2**20:.0f} MiB, over "
                                 f"the {CACHE_BYTES // 4 // 2**20} MiB a grammar may take (the limit)")
            with self._lock:
                if key not in self._cache:
                    self._cache[key] = compiled
                    self._cache_bytes += size
                while self._cache_bytes > CACHE_BYTES:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= old.memory_size_bytes
        return Grammar(compiled, self._reasoning(prompt_ids), _reserve(spec))

    @property
    def cached_bytes(self) -> int:
        return self._cache_bytes

    def _reasoning(self, prompt_ids: list[int]) -> str:
        if self.reasoning_end is None or self.assistant not in prompt_ids:
            return "none"
        last = prompt_ids[len(prompt_ids) - 1 - prompt_ids[::-1].index(self.assistant) :]
        if self.reasoning_end in last:
            return "none"
        return "inside" if self.think_open in last else "may_open"

    def _compile(self, spec: StructuredOutputsParams):
        import xgrammar as xgr

        try:
            if spec.kind == "regex":
                return self.compiler.compile_regex(spec.value)
            if spec.kind == "grammar":
                return self.compiler.compile_grammar(spec.value)
            if spec.kind == "choice":
                return self.compiler.compile_grammar("root ::= " + " | ".join(map(_literal, spec.value)))
            schema = json.dumps(spec.value)
            text = str(xgr.Grammar.from_json_schema(schema, any_whitespace=not spec.disable_any_whitespace,
                                                    strict_mode=spec.strict))
            return self.compiler.compile_grammar(_repaired(text))
        except Exception as e:  # xgrammar raises RuntimeError, ValueError or its own types, with a useful message
            raise FieldError("", spec.origin, _short(spec.value), f"cannot be compiled ({_first_line(e)})") from None

    def state(self, grammar: Grammar, limit: int, params) -> GrammarState:
        """A sequence's state: `limit` is the most tokens it may write (max_tokens, or what the context leaves)."""
        return GrammarState(grammar, (self.think_open, self.reasoning_end), self.stop_ids + params.stop_token_ids,
                            limit, params.thinking_token_budget)

    def masks(self, states: list[GrammarState | None], outputs: list[list[int]]) -> torch.Tensor | None:
        """The step's token bitmask [rows, ceil(V/32)] int32 on the host (every token allowed in rows without an
        active grammar), or None when no row has one."""
        import xgrammar as xgr

        bitmask = None
        for i, state in enumerate(states):
            if state is None or not state.advance(outputs[i]):
                continue
            rule = state.rule(outputs[i])
            if rule is None:
                continue
            if bitmask is None:
                bitmask = xgr.allocate_token_bitmask(len(states), self.vocab_size)
            start = time.perf_counter()
            state.fill(bitmask, i, rule)
            took = time.perf_counter() - start
            if took > MASK_BUDGET_S:  # this row is free this step; its request ends when its token comes back
                bitmask[i] = -1
                state.fail(f"structured output: the grammar took {took * 1e3:.0f} ms to find the allowed "
                           f"tokens for one step (the limit is {MASK_BUDGET_S * 1e3:.0f} ms; a simpler "
                           "grammar or schema avoids it)")
        return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Tokens whose bit is 0 get -inf, in place (bit j of word w is token 32w + j); one copy to the device."""
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    words = bitmask.to(logits.device, non_blocking=True)
    allowed = ((words[:, :, None] >> bits) & 1).bool().flatten(1)[:, : logits.shape[1]]
    return logits.masked_fill_(~allowed, float("-inf"))


def _reserve(spec: StructuredOutputsParams) -> int:
    """Tokens the shortest answer of this grammar takes at most (a token holds at least one character), and its
    stop token."""
    if spec.kind == "json":
        return _min_chars(spec.value, 0) + 1
    if spec.kind == "json_object":
        return 3
    if spec.kind == "choice":
        return min((len(c) for c in spec.value), default=1) + 1
    return RESERVE_TOKENS


def _min_chars(schema: Any, depth: int) -> int:
    """Characters of the shortest JSON instance of `schema` as xgrammar writes it without free whitespace
    (separators ", " and ": "), roughly: required members only."""
    if not isinstance(schema, dict) or depth > 40:
        return 1
    if "const" in schema:
        return len(json.dumps(schema["const"]))
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return min(len(json.dumps(v)) for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return min(_min_chars(s, depth + 1) for s in schema[key])
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "object":
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = [k for k in schema.get("required", []) if isinstance(k, str)]
        members = sum(len(json.dumps(k)) + 2 + _min_chars(props.get(k), depth + 1) for k in required)
        return 2 + members + 2 * max(0, len(required) - 1)  # xgrammar writes ": " and ", "
    if kind == "array":
        n = min(schema.get("minItems", 0) if isinstance(schema.get("minItems", 0), int) else 0, 1000)
        return 2 + n * _min_chars(schema.get("items"), depth + 1) + 2 * max(0, n - 1)
    if kind == "string":
        n = schema.get("minLength", 0) if isinstance(schema.get("minLength", 0), int) else 0
        return 2 + min(n, 100_000)
    if kind in ("boolean", "null"):
        return 4
    return 1


def _repaired(text: str) -> str:
    return text.replace(_FREE_CLASS, _PLAIN).replace(_BOUND_CLASS, f"({_CHAR})") + _RULES


def _literal(text: str) -> str:
    """An EBNF string literal for `text`."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _token_id(tokenizer, token: str) -> int | None:
    return tokenizer.get_added_vocab().get(token)


# xgrammar's C++ checks prefix their message with a timestamp, its source path and line, and "Check failed:"
_CPP_PREFIX = re.compile(r"^(\[[\d:]+\]\s*)?(\S+\.(cc|h|cpp):\d+:\s*)?(Check failed:\s*(.*?\)\s*is false:)?\s*)?")


def _first_line(e: Exception) -> str:
    """The library's first line of complaint, without its C++ source location: what the client may read."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return (_CPP_PREFIX.sub("", line).strip() or "the grammar library refused it")[:300]


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
