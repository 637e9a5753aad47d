"""glm45v caption: many images through the engine with continuous batching, results appended to a JSONL file
as each finishes (flushed), errors as lines of their own, resumable, Ctrl-C safe."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ..engine.answer import parse_answer, parse_boxes
from ..errors import Glm45vError
from ..inputs.video import VIDEO_SUFFIXES
from .draw import draw_boxes

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


# --- shards: replicas that each caption part of the inputs, merged afterwards -------------------------------

REST = "rest.jsonl"  # what a merge run captions itself: the inputs no shard finished


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise Glm45vError(f"--shard {text}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise Glm45vError(f"--shard {text}: expected 0 <= I < N")
    return i, n


def shard_of(path: str, n: int) -> int:
    """The shard of a path: a hash of the path as given, the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") % n


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def part_file(out: Path, i: int, n: int) -> Path:
    return parts_dir(out) / f"shard-{i}-of-{n}.jsonl"


def _records(file: Path) -> list[dict]:
    """A part's records; a torn last line (a replica killed mid-write) is ignored."""
    out = []
    if file.is_file():
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "path" in record:
                out.append(record)
    return out


def done_elsewhere(out: Path, target: Path) -> set[str]:
    """Paths finished in the merged output or in any part but `target` (a reshard redoes none of them)."""
    files = [out] + sorted(parts_dir(out).glob("*.jsonl")) if parts_dir(out).is_dir() else [out]
    return {r["path"] for f in files if f != target for r in _records(f)}


@dataclass
class ShardRow:
    name: str
    done: int = 0
    errors: int = 0
    missing: int = 0
    rate: float = 0.0


def shard_rows(paths: list[str], out: Path) -> list[ShardRow]:
    """Per part file: results, errors, its inputs that no part has finished (missing), images per second."""
    finished = done_elsewhere(out, Path())
    files = set(parts_dir(out).glob("*.jsonl"))
    for file in list(files):  # every shard of a split, also those that never wrote a line
        shard = re.fullmatch(r"shard-(\d+)-of-(\d+)", file.stem)
        if shard:
            files |= {part_file(out, i, int(shard[2])) for i in range(int(shard[2]))}
    rows = []
    for file in sorted(files):
        records = _records(file)
        row = ShardRow(file.stem, sum("error" not in r for r in records), sum("error" in r for r in records))
        shard = re.fullmatch(r"shard-(\d+)-of-(\d+)", file.stem)
        if shard:
            i, n = int(shard[1]), int(shard[2])
            row.missing = sum(shard_of(p, n) == i and p not in finished for p in paths)
        times = [(r["finished"] - r.get("seconds", 0.0), r["finished"]) for r in records if "finished" in r]
        if times:
            row.rate = len(times) / max(max(t for _, t in times) - min(t for t, _ in times), 1e-9)
        rows.append(row)
    return rows


def merge_parts(paths: list[str], out: Path, console: Console, missing_before: list[ShardRow]) -> None:
    """One OUT in input order from the parts (and an earlier merge), written whole and renamed into place."""
    by_path: dict[str, dict] = {}
    for file in [out] + sorted(parts_dir(out).glob("*.jsonl")):
        for record in _records(file):
            by_path.setdefault(record["path"], record)
    tmp = out.with_name(out.name + ".merging")
    with tmp.open("w", encoding="utf-8") as f:
        for path in paths:
            if path in by_path:
                f.write(json.dumps(by_path[path], ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    before = {row.name: row.missing for row in missing_before}
    t = Table(title=f"merged {sum(p in by_path for p in paths)} of {len(paths)} inputs into {escape(str(out))}")
    for col in ("part", "done", "errors", "missing before this run", "images/s"):
        t.add_column(col, justify="left" if col == "part" else "right")
    rows = shard_rows(paths, out)
    for row in rows:
        t.add_row(Text(row.name), str(row.done), str(row.errors), str(before.get(row.name, "-")),
                  f"{row.rate:.2f}" if row.rate else "-")
    t.add_row("total", str(sum(r.done for r in rows)), str(sum(r.errors for r in rows)),
              str(sum(before.values())), "")
    console.print(t)


def pending(paths: list[str], out: Path) -> list[str]:
    """The paths not yet in `out`."""
    done = _done_paths(out)
    return [p for p in paths if p not in done]


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
                thinking: bool | None, console: Console, system_prompt: str | None = None,
                draw: Path | None = None) -> int:
    """Returns the exit code: 0 when done, 130 when interrupted. Boxes go in the records in pixels; with `draw`
    each image whose answer has boxes is also written there with them drawn."""
    if overwrite and out.exists():
        out.unlink()
    done = _done_paths(out)
    todo = [p for p in paths if p not in done]
    if not todo:
        console.print(f"nothing to do: all {len(paths)} inputs are already in {out}", markup=False)
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
            record["finished"] = round(time.time(), 3)
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
                    boxes = parse_boxes(completion.text, result.image_sizes)
                    if boxes:
                        record["boxes"] = [b.as_dict() for b in boxes]
                        if draw is not None and media_kind(path) == "image":
                            record["drawn"] = _drawn(path, boxes, draw)
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


def _drawn(path: str, boxes: list, folder: Path) -> str | None:
    """The annotated copy of one input, named after it (and its path's hash: inputs in different folders may
    share a name); a copy that cannot be written is said in the record, the run goes on."""
    target = folder / f"{Path(path).stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}.png"
    try:
        return str(draw_boxes(path, boxes, target))
    except Glm45vError as e:
        return f"not drawn: {e}"


def _summary(console: Console, stats: dict, seconds: float, skipped: int, out: Path, interrupted: bool) -> None:
    t = Table(title="caption " + ("interrupted: run again to finish" if interrupted else "summary"))
    t.add_column("")
    t.add_column("", justify="right")
    for name, value in [("captioned", stats["ok"]), ("errors", stats["error"]), ("skipped (already done)", skipped),
                        ("prompt tokens", stats["prompt_tokens"]), ("completion tokens", stats["completion_tokens"]),
                        ("seconds", f"{seconds:.1f}"), ("output", str(out))]:
        t.add_row(name, Text(str(value)))  # as text: paths may hold [brackets]
    console.print(t)
