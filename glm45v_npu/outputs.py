"""What a request gives back, shaped like vLLM's outputs so vLLM scripts read them unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


@dataclass
class ToolCall:
    """A function call the model made; `arguments` is JSON text, as OpenAI's API gives it."""

    id: str
    name: str
    arguments: str

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Box:
    """One box or point of an answer. `norm` is GLM's 0-1000 scale, clamped, as fractions (0-1) of the width
    (x) and height (y); `pixels` the same in the referred image's pixels (as the user sees it: EXIF orientation
    applied, before any resize), None when no image size is known; `image` its index among the request's images;
    `span` the [start, end) of its bracket text in the text it was parsed from."""

    kind: str  # "box" or "point"
    norm: tuple[float, ...]
    pixels: tuple[int, ...] | None
    image: int | None
    span: tuple[int, int]

    def as_dict(self) -> dict:
        return {"type": self.kind, "norm": list(self.norm), "pixels": list(self.pixels) if self.pixels else None,
                "image": self.image, "span": list(self.span)}


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None  # per token: the sampled token and the top-N, when asked for
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it; None for eos
    tool_calls: list[ToolCall] | None = None  # LLM.chat(tools=...): the calls parsed from the text
    boxes: list[Box] | None = None  # once finished: the answer's grounding boxes and points (engine/answer.py)


@dataclass
class RequestMetrics:
    arrival_time: float  # time.perf_counter() clock
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[list[float]] = field(default_factory=list)  # per completion: seconds from arrival per token

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # set when the request was rejected or the engine ended it (the others go on)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # the prompt's images, (width, height)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # SamplingParams.prompt_logprobs (first: None)
