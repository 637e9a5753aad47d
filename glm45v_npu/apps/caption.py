"""glm45v caption: many images through the engine with continuous batching, results appended to a JSONL file
as each finishes (flushed), errors as lines of their own, resumable, Ctrl-C safe."""

from __future__ import annotations

import glob
import json
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..engine.answer import parse_answer
from ..errors import Glm45vError
from ..inputs.video import VIDEO_SUFFIXES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_FILE_BYTES = 64 * 2**20


def collect_inputs(inputs: list[str], recursive: bool) -> list[str]:
    """Files, folders, globs and .txt lists of paths -> image and video paths, in order, without repeats."""
    found: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            found += sorted(str(f) for f in p.glob(pattern)
                            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        elif p.is_file() and p.suffix.lower() == ".txt":
            found += [line.strip() for line in p.read_text().splitlines() if line.strip()]
        elif p.is_file():
            found.append(str(p))
        elif any(c in item for c in "*?["):
            found += sorted(f for f in glob.glob(item, recursive=recursive) if Path(f).is_file())
        else:
            raise Glm45vError(f"input {item}: no such file, folder or glob match")
    return list(dict.fromkeys(found))


def _done_paths(out: Path) -> set[str]:
    """Paths already in the output (results and errors); a torn last line from a crash is ignored."""
    done = set()
    if out.is_file():
        for line in out.read_text().splitlines():
            try:
                done.add(json.loads(line)["path"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def media_kind(path: str) -> str:
    return "video" if Path(path).suffix.lower() in VIDEO_SUFFIXES else "image"


def _check_file(path: str) -> None:
    p, kind = Path(path), media_kind(path)
    if not p.is_file():
        raise Glm45vError(f"{kind} {path}: no such file")
    size = p.stat().st_size
    if size == 0:
        raise Glm45vError(f"{kind} {path}: empty file")
    limit = MAX_FILE_BYTES * (16 if kind == "video" else 1)
    if size > limit:
        raise Glm45vError(f"{kind} {path}: {size / 2**20:.0f} MiB is over the {limit // 2**20} MiB limit")


def run_caption(llm, paths: list[str], out: Path, prompt: str, params, batch: int, overwrite: bool,
                thinking: bool | None, console: Console, system_prompt: str | None = None) -> int:
    """Returns the exit code: 0 when done, 130 when interrupted."""
    if overwrite and out.exists():
        out.unlink()
    done = _done_paths(out)
    todo = [p for p in paths if p not in done]
    if not todo:
        console.print(f"nothing to do: all {len(paths)} inputs are already in {out}")
        return 0
    # a torn last line (killed mid-write) must not glue onto the next record
    if out.is_file() and out.stat().st_size and not out.read_bytes().endswith(b"\n"):
        with out.open("a") as f:
            f.write("\n")
    stats = {"ok": 0, "error": 0, "prompt_tokens": 0, "completion_tokens": 0}
    start = time.perf_counter()
    in_flight: dict[int, tuple[str, float]] = {}
    queue = deque(todo)
    progress = Progress(TextColumn("captioning"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]:.2f} img/s"), TimeRemainingColumn(), console=console)
    task = progress.add_task("", total=len(todo), rate=0.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    interrupted = False
    with out.open("a", encoding="utf-8") as f, progress:

        def write(record: dict) -> None:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            stats["error" if "error" in record else "ok"] += 1
            progress.update(task, advance=1, rate=(stats["ok"] + stats["error"]) / (time.perf_counter() - start))

        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        params = replace(params, n=1, output_kind="final_only")
        try:
            while queue or in_flight:
                while queue and len(in_flight) < batch:
                    path = queue.popleft()
                    try:
                        _check_file(path)
                        kind = media_kind(path)
                        message = {"role": "user", "content": [{"type": kind, kind: path},
                                                               {"type": "text", "text": prompt}]}
                        rid = llm.add_request({"messages": [*system, message]}, params, enable_thinking=thinking)
                        in_flight[rid] = (path, time.perf_counter())
                    except Glm45vError as e:
                        write({"path": path, "error": str(e)})
                for result in llm.step():
                    if not result.finished or result.request_id not in in_flight:
                        continue
                    path, t0 = in_flight.pop(result.request_id)
                    completion = result.outputs[0]
                    parsed = parse_answer(completion.text)
                    record = {"path": path, "answer": parsed.answer, "prompt_tokens": len(result.prompt_token_ids),
                              "completion_tokens": len(completion.token_ids),
                              "finish_reason": completion.finish_reason, "seconds": round(time.perf_counter() - t0, 3)}
                    if parsed.reasoning:
                        record["reasoning"] = parsed.reasoning
                    if parsed.boxes:
                        record["boxes"] = parsed.boxes
                    stats["prompt_tokens"] += record["prompt_tokens"]
                    stats["completion_tokens"] += record["completion_tokens"]
                    write(record)
        except KeyboardInterrupt:
            interrupted = True
            for rid in list(in_flight):
                llm.abort(rid)
            while llm.has_unfinished():  # collect the aborted requests' final reports: nothing left behind
                llm.step()
    _summary(console, stats, time.perf_counter() - start, len(paths) - len(todo), out, interrupted)
    return 130 if interrupted else 0


def _summary(console: Console, stats: dict, seconds: float, skipped: int, out: Path, interrupted: bool) -> None:
    t = Table(title="caption " + ("interrupted: run again to finish" if interrupted else "summary"))
    t.add_column("")
    t.add_column("", justify="right")
    for name, value in [("captioned", stats["ok"]), ("errors", stats["error"]), ("skipped (already done)", skipped),
                        ("prompt tokens", stats["prompt_tokens"]), ("completion tokens", stats["completion_tokens"]),
                        ("seconds", f"{seconds:.1f}"), ("output", str(out))]:
        t.add_row(name, str(value))
    console.print(t)
