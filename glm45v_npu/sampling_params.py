"""SamplingParams: vLLM's names and meanings, every value checked on construction (errors name the field)."""

from __future__ import annotations

import json as _json
import math
from dataclasses import dataclass, field

from .errors import FieldError

OUTPUT_KINDS = ("cumulative", "delta", "final_only")
MAX_LOGPROBS = 20
# reasoning_effort (OpenAI's field): none and minimal turn thinking off; the others set a thinking budget (README)
REASONING_BUDGETS = {"none": 0, "minimal": 0, "low": 1024, "medium": 4096, "high": None}
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# What a structured-output request may ask for, counted before anything validates or compiles it (README:
# "Limits"): past these, schema validation, grammar compilation or the per-token mask take seconds of CPU and
# grow memory by gigabytes, for one request.
MAX_SCHEMA_NODES = 4_096  # values and keys in a JSON schema (a property costs about 4; compiling 4,096 takes ~1 s)
MAX_SCHEMA_DEPTH = 32  # nesting of objects and arrays in a JSON schema
MAX_CHOICES = 1_024  # guided_choice alternatives
MAX_GRAMMAR_CHARS = 64 * 1024  # characters of a regex, an EBNF grammar, or all choices together
MAX_REGEX_EXPANSION = 4_096  # counted repetitions a regex unrolls to (a{1,100} counts 100; nested ones multiply)


def effort_budget(effort: str, where: str = "") -> int | None:
    """reasoning_effort -> its thinking_token_budget (0: thinking off, which the template's enable_thinking says)."""
    if effort not in REASONING_BUDGETS:
        raise FieldError(where, "reasoning_effort", effort, f"expected one of {', '.join(REASONING_BUDGETS)}")
    return REASONING_BUDGETS[effort]


@dataclass
class StructuredOutputsParams:
    """vLLM's names: exactly one of `json` (a JSON schema, as a dict or its text), `json_object` (any JSON object),
    `regex`, `choice` (one of these strings) or `grammar` (EBNF, xgrammar's dialect). `strict`: properties not in
    the schema are refused unless it allows them (OpenAI's strict json_schema; off: xgrammar's lenient mode).
    `origin` names the request field in errors (the server sets it, e.g. response_format.json_schema.schema)."""

    json: dict | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = True
    strict: bool = True
    origin: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        where = self.origin or "structured_outputs"
        if len(given) != 1:
            raise FieldError("", where, ", ".join(given) or "nothing",
                             f"expected exactly one of {', '.join(STRUCTURED_KINDS)}")
        self.kind = given[0]
        self.origin = self.origin or f"structured_outputs.{self.kind}"
        if isinstance(self.json, str):
            try:
                self.json = _json.loads(self.json)
            except ValueError as e:
                raise FieldError("", self.origin, self.json[:80], f"not valid JSON ({e})") from None
        checks = {"json": lambda v: isinstance(v, dict), "json_object": lambda v: v is True,
                  "regex": lambda v: isinstance(v, str) and v != "", "grammar": lambda v: isinstance(v, str) and v != "",
                  "choice": lambda v: isinstance(v, list) and v and all(isinstance(c, str) and c for c in v)}
        wants = {"json": "a JSON schema object", "json_object": "true", "regex": "a non-empty string",
                 "grammar": "a non-empty EBNF string", "choice": "a non-empty list of non-empty strings"}
        if not checks[self.kind](getattr(self, self.kind)):
            raise FieldError("", self.origin, getattr(self, self.kind), f"expected {wants[self.kind]}")
        _check_size(self.kind, getattr(self, self.kind), self.origin)
        for name in ("disable_any_whitespace", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise FieldError("", f"structured_outputs.{name}", getattr(self, name), "expected true or false")
        if self.kind == "json":
            _check_schema(self.json, self.origin)

    @property
    def value(self):
        """What the grammar is built from: the schema ({"type": "object"} for json_object), regex, choices or EBNF."""
        return {"type": "object"} if self.kind == "json_object" else getattr(self, self.kind)


def _check_size(kind: str, value, origin: str) -> None:
    """The documented bounds, counted without recursion (a deep schema must not overflow the stack first)."""
    if kind == "json":
        nodes, stack = 0, [(value, 1)]
        while stack:
            node, depth = stack.pop()
            nodes += 1
            if nodes > MAX_SCHEMA_NODES:
                raise FieldError("", origin, "(schema)", f"has more than {MAX_SCHEMA_NODES} values (the limit)")
            if depth > MAX_SCHEMA_DEPTH:
                raise FieldError("", origin, "(schema)", f"nests deeper than {MAX_SCHEMA_DEPTH} levels (the limit)")
            children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
            stack.extend((child, depth + 1) for child in children)
            if isinstance(node, dict):
                nodes += len(node)  # the keys
    elif kind == "choice":
        if len(value) > MAX_CHOICES:
            raise FieldError("", origin, f"({len(value)} choices)", f"has more than {MAX_CHOICES} choices (the limit)")
        if sum(len(c) for c in value) > MAX_GRAMMAR_CHARS:
            raise FieldError("", origin, "(choices)", f"are longer than {MAX_GRAMMAR_CHARS} characters in all "
                             "(the limit)")
    elif kind in ("regex", "grammar"):
        if len(value) > MAX_GRAMMAR_CHARS:
            raise FieldError("", origin, value[:80], f"is longer than {MAX_GRAMMAR_CHARS} characters (the limit)")
        if kind == "regex" and regex_expansion(value) > MAX_REGEX_EXPANSION:
            raise FieldError("", origin, value[:80], f"unrolls to more than {MAX_REGEX_EXPANSION} repetitions "
                             "(counted repetitions such as {1,100} multiply when nested; the limit)")


def regex_expansion(pattern: str) -> int:
    """How far a regex's counted repetitions unroll: each {m,n} multiplies what it repeats by n, a group adds up
    its parts. ([a-z]{1,100}){1,100} unrolls to 10,000; [a-z]{1,64}@[a-z]{1,255} to 319. An estimate: what it
    bounds is the grammar the regex becomes, whose size sets compile time and the per-token mask's work."""
    stack: list[list[int]] = [[]]  # per open group: the cost of each item so far
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            stack[-1].append(1)
            i += 2
            continue
        if ch == "[":  # a class is one item; find its end (escapes and a leading ] included)
            j = i + 1 + (pattern[i + 1 : i + 2] == "^")
            j += pattern[j : j + 1] == "]"
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            stack[-1].append(1)
            i = j + 1
            continue
        if ch == "(":
            stack.append([])
        elif ch == ")" and len(stack) > 1:
            inner = stack.pop()
            stack[-1].append(max(1, sum(inner)))
        elif ch == "{" and stack[-1]:
            j = pattern.find("}", i)
            bounds = pattern[i + 1 : j].split(",") if j > i else []
            if 1 <= len(bounds) <= 2 and all(b.strip().isdigit() or b.strip() == "" for b in bounds):
                top = bounds[-1].strip() or bounds[0].strip() or "1"
                stack[-1][-1] *= max(1, int(top[:9]))
                i = j + 1
                continue
            stack[-1].append(1)
        elif ch not in "|*+?^$":
            stack[-1].append(1)
        i += 1
    while len(stack) > 1:
        inner = stack.pop()
        stack[-1].append(sum(inner))
    return sum(stack[0])


def _check_schema(schema: dict, origin: str) -> None:
    """A schema that is not valid JSON Schema (draft 2020-12) is refused naming the field and the fault. In a
    server the check runs in a process of its own (schema_checks_apart): it is Python work that would otherwise
    hold the interpreter lock, every stream's engine steps waiting on it, for as long as it takes."""
    problem = _schema_problem(schema) if _apart is None else _checked_apart(schema)
    if problem is not None:
        raise FieldError("", origin, _json.dumps(schema)[:80], problem)


def _schema_problem(schema: dict) -> str | None:
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        at = "/".join(str(p) for p in e.absolute_path)
        return f"not a valid JSON schema{f' at {at}' if at else ''}: {e.message}"
    except RecursionError:
        return "nests too deeply to be checked"
    return None


SCHEMA_CHECK_S = 10.0  # what checking one schema may take in the checking process (README: "Limits")
_apart = None  # the checking process's handle while schema checks run apart


def schema_checks_apart(on: bool = True) -> None:
    """From now on, check JSON schemas in a process of their own, each within SCHEMA_CHECK_S; or, with on=False,
    stop that process and check in the caller again (a server's start and stop)."""
    global _apart
    from .apart import Apart

    if on and _apart is None:
        _apart = Apart()
    elif not on and _apart is not None:
        _apart.close()
        _apart = None


def _checked_apart(schema: dict) -> str | None:
    from .apart import TooLong

    try:
        return _apart.run(_schema_problem, schema, timeout=SCHEMA_CHECK_S)
    except TooLong:
        return f"took longer than {SCHEMA_CHECK_S:.0f} s to check (the limit)"


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: until the context is full
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0  # on generated tokens, as OpenAI and vLLM define them
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # on prompt and generated tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    min_tokens: int = 0  # eos and stop tokens are masked out until this many tokens are generated
    logprobs: int | None = None  # None: no logprobs; N: the sampled token's and the top N
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and the top N (no prefix cache hit)
    skip_special_tokens: bool = True
    output_kind: str = "cumulative"  # what step() reports: the whole output so far, only what is new, or the end
    structured_outputs: StructuredOutputsParams | None = None  # the output follows this grammar
    # vLLM's name: at most this many tokens between the model's <think> and its </think>, which is then forced
    # (0: the model may not open <think>); None: no budget but max_tokens (a constrained answer keeps its room)
    thinking_token_budget: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self._check_types()
        checks = [
            ("n", 1 <= self.n <= 64, "must be in 1..64"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0 <= self.temperature <= 100, "must be in [0, 100]"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", -1 <= self.top_k < 2**31, "must be in -1..2^31-1 (0 or -1 = off)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 100, "must be in (0, 100]"),
            ("stop", all(s for s in self.stop), "stop strings must be non-empty"),
            ("stop_token_ids", all(0 <= t < 2**31 for t in self.stop_token_ids), "token ids must be in 0..2^31-1"),
            ("min_tokens", self.min_tokens >= 0 and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
             "must be in 0..max_tokens"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"must be in 0..{MAX_LOGPROBS}"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"must be in 0..{MAX_LOGPROBS}"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be in 0..2^63-1"),
            ("thinking_token_budget", self.thinking_token_budget is None or self.thinking_token_budget >= 0,
             "must be >= 0"),
            ("output_kind", self.output_kind in OUTPUT_KINDS, f"expected one of {', '.join(OUTPUT_KINDS)}"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise FieldError("SamplingParams: ", name, getattr(self, name), why)

    def _check_types(self) -> None:
        ints = ("n", "max_tokens", "top_k", "seed", "min_tokens", "logprobs", "prompt_logprobs", "thinking_token_budget")
        floats = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
        bools = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")
        for name in ints + floats:
            v = getattr(self, name)
            if v is None and name in ("max_tokens", "seed", "logprobs", "prompt_logprobs", "thinking_token_budget"):
                continue
            kinds = (int,) if name in ints else (int, float)
            if isinstance(v, bool) or not isinstance(v, kinds) or (isinstance(v, float) and not math.isfinite(v)):
                raise FieldError("SamplingParams: ", name, v,
                                 f"expected {'an integer' if name in ints else 'a finite number'}")
        for name in bools:
            if not isinstance(getattr(self, name), bool):
                raise FieldError("SamplingParams: ", name, getattr(self, name), "expected true or false")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise FieldError("SamplingParams: ", "stop", self.stop, "expected a string or a list of strings")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise FieldError("SamplingParams: ", "stop_token_ids", self.stop_token_ids, "expected a list of integers")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise FieldError("SamplingParams: ", "structured_outputs", type(self.structured_outputs).__name__,
                             "expected a StructuredOutputsParams")
        if not isinstance(self.output_kind, str):
            raise FieldError("SamplingParams: ", "output_kind", self.output_kind, "expected a string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
