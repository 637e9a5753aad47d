"""glm45v chat: one conversation with images and videos, streamed; the reasoning shows dim and apart, grounding
boxes highlighted (and drawn on the image with --draw or /draw). One turn (`--prompt`) or a prompt loop with
/image, /video, /draw, /reset, /exit."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from rich.console import Console
from rich.text import Text

from ..engine.answer import Box, StreamSplitter, parse_answer, parse_boxes
from ..errors import Glm45vError
from ..inputs.media import open_image
from ..inputs.video import check_video
from .draw import draw_boxes

HELP = ("/image PATH or /video PATH attaches it to the next turn; /draw PATH writes the last answer's boxes on "
        "its image; /reset clears the history; /exit quits; /help")
STYLES = {"reasoning": "dim", "answer": "", "box": "bold cyan"}


def checked(kind: str, path) -> tuple[str, str]:
    """(kind, path), once the file opens as an image or a video (the request carries the path, so later errors
    name it too)."""
    if kind == "image":
        open_image(str(path))
    else:
        check_video(str(path))
    return kind, str(path)


def print_error(console: Console, error: object) -> None:
    """An error as plain text after a red label: its text may hold brackets that rich would read as markup."""
    console.print(Text.assemble(("error: ", "red"), str(error)))


class ChatSession:
    """The history, the media waiting for the next turn, and how answers are shown."""

    def __init__(self, llm, params, system_prompt: str | None, think: bool | None, as_json: bool, one_shot: bool,
                 out: Console, err: Console, draw: str | None = None):
        self.llm, self.params, self.think = llm, params, think
        self.as_json, self.one_shot, self.out, self.err = as_json, one_shot, out, err
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.history: list[dict] = list(self.system)
        self.pending: list[tuple[str, str]] = []
        self.draw = draw  # --draw: every answer with boxes is drawn there
        self.last: tuple[str | None, list[Box]] = (None, [])  # the last answer's image and boxes, for /draw

    def turn(self, text: str) -> dict:
        content = [{"type": kind, kind: path} for kind, path in self.pending] + [{"type": "text", "text": text}]
        self.history.append({"role": "user", "content": content})
        try:
            result, boxes = self._stream(self.history)
        except Glm45vError:
            self.history.pop()
            raise
        self.history.append({"role": "assistant", "content": result["answer"]})
        self.pending.clear()
        self.last = (self._last_image(), boxes)
        if self.draw and self.last[1]:
            self.draw_last(self.draw)
        elif self.draw:
            self.err.print(Text(f"--draw {self.draw}: the answer has no boxes, nothing drawn", style="dim"))
        if self.as_json:
            print(json.dumps(result, ensure_ascii=False))
        return result

    def _last_image(self) -> str | None:
        """The image an answer's boxes refer to: the conversation's last (engine/answer.parse_boxes)."""
        images = [p["image"] for m in self.history if isinstance(m["content"], list)
                  for p in m["content"] if p["type"] == "image"]
        return images[-1] if images else None

    def draw_last(self, path: str) -> None:
        image, boxes = self.last
        if not boxes:
            raise Glm45vError(f"/draw {path}: the last answer has no boxes")
        if image is None:
            raise Glm45vError(f"/draw {path}: the conversation has no image to draw the boxes on")
        written = draw_boxes(image, boxes, path)
        self.err.print(Text(f"drew {len(boxes)} box(es) on {image} -> {written}", style="dim"))

    def _stream(self, messages: list[dict]) -> tuple[dict, list[Box]]:
        """Stream one answer: reasoning dim (stderr when one-shot, so stdout pipes the answer), boxes
        highlighted. Ctrl-C stops this answer, not the session."""
        splitter = StreamSplitter()
        rid = self.llm.add_request({"messages": list(messages)}, replace(self.params, n=1, output_kind="delta"),
                                   enable_thinking=self.think)
        raw, tokens, final, stopped = [], 0, None, False
        try:
            while final is None:
                for o in self.llm.step():
                    if o.request_id != rid:
                        continue
                    piece = o.outputs[0]
                    raw.append(piece.text)
                    tokens += len(piece.token_ids)
                    self._show(splitter.feed(piece.text))
                    if o.finished:
                        final = o
        except KeyboardInterrupt:
            stopped = True
            self.llm.abort(rid)
        self._show(splitter.flush())
        if not self.as_json:
            self.out.print()
            if stopped:
                self.err.print("[dim](stopped)[/dim]")
        parsed = parse_answer("".join(raw))
        boxes = parse_boxes(parsed.raw, final.image_sizes if final else None)
        return {"answer": parsed.answer, "reasoning": parsed.reasoning, "boxes": [b.as_dict() for b in boxes],
                "raw": parsed.raw,
                "finish_reason": "abort" if stopped else final.outputs[0].finish_reason,
                "prompt_tokens": len(final.prompt_token_ids) if final else None, "completion_tokens": tokens}, boxes

    def _show(self, pieces: list[tuple[str, str]]) -> None:
        if self.as_json:
            return
        for kind, text in pieces:
            console = self.err if (self.one_shot and kind == "reasoning") else self.out
            console.print(text, style=STYLES[kind], end="", markup=False)

    def command(self, line: str) -> bool:
        """One line of the prompt loop; False when the user leaves."""
        if line in ("/exit", "/quit"):
            return False
        if line == "/help":
            self.err.print(HELP, markup=False)
        elif line == "/reset":
            self.history[:] = list(self.system)
            self.pending.clear()
            self.err.print("[dim]history cleared[/dim]")
        elif line.startswith("/draw"):
            try:
                self.draw_last(line[5:].strip() or "boxes.png")
            except Glm45vError as e:
                print_error(self.err, e)
        elif line.startswith(("/image", "/video")):
            kind, path = line[1:6], line[6:].strip()
            try:
                self.pending.append(checked(kind, path))
                self.err.print(Text(f"attached {path} to the next turn", style="dim"))
            except Glm45vError as e:
                print_error(self.err, e)
        elif line.startswith("/"):
            self.err.print(Text.assemble((f"unknown command {line.split()[0]}", "red"), f"; {HELP}"))
        else:
            try:
                self.turn(line)
            except Glm45vError as e:  # e.g. the history no longer fits the context: the session goes on
                print_error(self.err, e)
        return True

    def loop(self) -> None:
        self.err.print(Text(HELP, style="dim"))
        while True:
            try:
                line = input("> " if sys.stdin.isatty() else "").strip()
            except EOFError:
                return
            except KeyboardInterrupt:  # at the prompt, Ctrl-C clears the line; /exit or Ctrl-D leaves
                self.err.print()
                continue
            if line and not self.command(line):
                return
