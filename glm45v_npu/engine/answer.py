"""GLM-4.5V answers: `<think>reasoning</think>` then the answer, final answers and grounding boxes wrapped in
`<|begin_of_box|>...<|end_of_box|>`. Evaluations that forget to unwrap the box score near chance."""

from __future__ import annotations

from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
MARKERS = (THINK_OPEN, THINK_CLOSE, BOX_OPEN, BOX_CLOSE)


@dataclass
class ParsedAnswer:
    raw: str
    reasoning: str = ""
    answer: str = ""
    boxes: list[str] = field(default_factory=list)


def parse_answer(raw: str) -> ParsedAnswer:
    segments = _segments(raw)
    return ParsedAnswer(
        raw,
        reasoning="".join(text for kind, text in segments if kind == "reasoning").strip(),
        answer="".join(text for kind, text in segments if kind != "reasoning").strip(),  # boxes unwrapped in place
        boxes=[text.strip() for kind, text in segments if kind == "box"],
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
