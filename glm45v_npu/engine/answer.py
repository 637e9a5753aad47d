"""GLM-4.5V answers: `<think>reasoning</think>` then the answer, final answers and grounding boxes wrapped in
`<|begin_of_box|>...<|end_of_box|>`. Evaluations that forget to unwrap the box score near chance."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..outputs import Box

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
MARKERS = (THINK_OPEN, THINK_CLOSE, BOX_OPEN, BOX_CLOSE)


@dataclass
class ParsedAnswer:
    raw: str
    reasoning: str = ""
    answer: str = ""


def parse_answer(raw: str) -> ParsedAnswer:
    segments = _segments(raw)
    return ParsedAnswer(
        raw,
        reasoning="".join(text for kind, text in segments if kind == "reasoning").strip(),
        answer="".join(text for kind, text in segments if kind != "reasoning").strip(),  # boxes unwrapped in place
    )


def _segments(raw: str) -> list[tuple[str, str]]:
    # An answer that closes a think block it never opened had its <think> pre-filled by the template.
    s = StreamSplitter(in_think=THINK_CLOSE in raw and THINK_OPEN not in raw.split(THINK_CLOSE)[0])
    return s.feed(raw) + s.flush()


class StreamSplitter:
    """Splits streamed text into ("reasoning" | "answer" | "box", text) pieces as it arrives; a marker split
    across two deltas is held back until it is complete."""

    def __init__(self, in_think: bool = False, keep_box_markers: bool = False, breaks: tuple[str, ...] = ()):
        self.in_think, self.in_box = in_think, False
        self.keep_box_markers = keep_box_markers  # the API's content keeps them; the CLI highlights boxes instead
        self.breaks = breaks  # answer markers that end reasoning where they appear (a tool call), kept as answer
        self.markers = MARKERS + breaks
        self.pending = ""

    def _kind(self) -> str:
        return "reasoning" if self.in_think else "box" if self.in_box else "answer"

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.pending += text
        out: list[tuple[str, str]] = []
        while self.pending:
            hits = [(self.pending.find(m), m) for m in self.markers if m in self.pending]
            if hits:
                i, marker = min(hits)
                if i:
                    out.append((self._kind(), self.pending[:i]))
                if marker in self.breaks:
                    out.append(("answer", marker))
                    self.pending, self.in_think = self.pending[i + len(marker) :], False
                    continue
                if self.keep_box_markers and marker in (BOX_OPEN, BOX_CLOSE) and not self.in_think:
                    out.append(("box", marker))
                self.pending = self.pending[i + len(marker) :]
                self.in_think = {THINK_OPEN: True, THINK_CLOSE: False}.get(marker, self.in_think)
                self.in_box = {BOX_OPEN: True, BOX_CLOSE: False}.get(marker, self.in_box)
                continue
            keep = max((k for m in self.markers for k in range(1, len(m)) if self.pending.endswith(m[:k])), default=0)
            emit = self.pending[: len(self.pending) - keep]
            if emit:
                out.append((self._kind(), emit))
            self.pending = self.pending[len(emit) :]
            break
        return out

    def flush(self) -> list[tuple[str, str]]:
        rest, self.pending = self.pending, ""
        return [(self._kind(), rest)] if rest else []


class ReasoningStream:
    """Streamed text -> (reasoning delta, content delta), as an OpenAI-style API reports them: the <think> part
    is reasoning; the rest is content, grounding box markers kept. Text before any <think> is content, so an
    answer that skips thinking is all content."""

    def __init__(self, breaks: tuple[str, ...] = ()):
        self.splitter = StreamSplitter(keep_box_markers=True, breaks=breaks)

    def _join(self, pieces: list[tuple[str, str]]) -> tuple[str, str]:
        reasoning = "".join(text for kind, text in pieces if kind == "reasoning")
        return reasoning, "".join(text for kind, text in pieces if kind != "reasoning")

    def feed(self, text: str) -> tuple[str, str]:
        return self._join(self.splitter.feed(text))

    def flush(self) -> tuple[str, str]:
        return self._join(self.splitter.flush())


def split_reasoning(text: str, breaks: tuple[str, ...] = ()) -> tuple[str, str]:
    """Whole text -> (reasoning, content); `breaks` end the reasoning where they appear (see StreamSplitter)."""
    stream = ReasoningStream(breaks)
    a, b = stream.feed(text)
    c, d = stream.flush()
    return a + c, b + d


# --- grounding -------------------------------------------------------------------------------------------------
# GLM-4.5V writes a box as [x1,y1,x2,y2] and a point as [x,y], each value the fraction of the image's width or
# height times 1000; several in one marker pair ([[...],[...]]), in any of the bracket styles below.
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_GROUP = re.compile(r"[\[\(<]" + ",".join([_NUMBER] * 2) + r"(?:," + ",".join([_NUMBER] * 2) + r")?[\]\)>]")
SCALE = 1000


def answer_ranges(text: str) -> list[tuple[int, int]]:
    """The [start, end) ranges of `text` that are answer, not reasoning: outside <think>...</think> (an unclosed
    one runs to the end; a </think> never opened closes reasoning the template began)."""
    ranges, at = [], 0
    first_close, first_open = text.find(THINK_CLOSE), text.find(THINK_OPEN)
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        at = first_close + len(THINK_CLOSE)
    while at < len(text):
        opened = text.find(THINK_OPEN, at)
        if opened == -1:
            ranges.append((at, len(text)))
            break
        ranges.append((at, opened))
        closed = text.find(THINK_CLOSE, opened)
        if closed == -1:
            break
        at = closed + len(THINK_CLOSE)
    return [(a, b) for a, b in ranges if b > a]


def parse_boxes(text: str, image_sizes: list[tuple[int, int]] | None = None) -> list[Box]:
    """The boxes and points of an answer, inside <|begin_of_box|>...<|end_of_box|> (an unclosed one at the end of
    a cut stream counts up to the end), reasoning left out. They refer to the last image of the request (with
    several images in a turn the answer does not say which; the latest is what a user asks about). Text between
    the markers that is not a box is left as text."""
    sizes = list(image_sizes or [])
    image = len(sizes) - 1 if sizes else None
    size = sizes[-1] if sizes else None
    out = []
    for start, end in answer_ranges(text):
        at = start
        while True:
            opened = text.find(BOX_OPEN, at, end)
            if opened == -1:
                break
            inner = opened + len(BOX_OPEN)
            closed = text.find(BOX_CLOSE, inner, end)
            stop = end if closed == -1 else closed
            for m in _GROUP.finditer(text, inner, stop):
                values = [float(v) for v in m.groups() if v is not None]
                out.append(_box(values, size, image, m.span()))
            at = end if closed == -1 else closed + len(BOX_CLOSE)
    return out


def _box(values: list[float], size: tuple[int, int] | None, image: int | None, span: tuple[int, int]) -> Box:
    frac = [min(max(v, 0.0), SCALE) / SCALE for v in values]
    if len(frac) == 4:  # corners in either order
        frac = [min(frac[0], frac[2]), min(frac[1], frac[3]), max(frac[0], frac[2]), max(frac[1], frac[3])]
    pixels = None
    if size is not None:
        w, h = size
        pixels = tuple(round(f * (w if i % 2 == 0 else h)) for i, f in enumerate(frac))
    return Box("box" if len(frac) == 4 else "point", tuple(frac), pixels, image, span)
