"""Incremental detokenisation for streaming: multi-byte UTF-8 safe, stop strings trimmed and held back.

Skipping special tokens keeps the answer's structure markers (think, box and tool calls), which some tokenizers
mark special: the output parser needs them, and the raw text should show them.
"""

from __future__ import annotations

from .answer import MARKERS
from .tool_calls import TOOL_MARKERS


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool, stop: list[str], include_stop: bool = False):
        self.tok = tokenizer
        self.drop: set[int] = set()
        if tokenizer is not None and skip_special_tokens:
            keep = {tokenizer.convert_tokens_to_ids(m) for m in MARKERS + TOOL_MARKERS}
            self.drop = set(tokenizer.all_special_ids) - keep
        self.stop, self.include_stop = stop, include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars that could still start a stop string
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0
        self.text = ""
        self.emitted = 0
        self.stopped: str | None = None  # the stop string that ended the text

    def _decode(self, ids: list[int]) -> str:
        if self.tok is None:
            return ""
        return self.tok.decode([i for i in ids if i not in self.drop], skip_special_tokens=False)

    def add(self, token: int) -> None:
        """Feed one token; sets `stopped` when a stop string appears (the text is cut before it, or after it with
        include_stop)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            start = max(0, len(self.text) - self.hold)
            self.text += now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                i, s = min(hits)
                self.text = self.text[: i + len(s) if self.include_stop else i]
                self.stopped = s

    def finish(self) -> None:
        """Flush bytes still pending (an unfinished character becomes U+FFFD) unless a stop string ended it."""
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix : self.read])
            self.text += self._decode(self.ids[self.prefix :])[len(before) :]
            self.read = len(self.ids)

    def delta(self, final: bool) -> str:
        """New text safe to show: while running, the last few chars wait in case a stop string is forming."""
        end = len(self.text) if final or not self.stop else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
