"""The glm45v command: chat, bench, caption, info."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import Glm45vError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="A lightweight, fast inference runner for GLM-4.5V.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="checkpoint folder, hub id, 'tiny-random' or a "
                                       "built-in config ('glm-4.5v', with --load-format dummy)")]
DeviceOpt = Annotated[str | None, typer.Option(help="npu, cuda or cpu (default: the first available)")]
DtypeOpt = Annotated[str | None, typer.Option(help="bfloat16, float16 or float32 (default: bf16, fp32 on cpu)")]
TPOpt = Annotated[int, typer.Option("--tensor-parallel-size", "-tp", help="devices (processes) to split over")]
TPExpertsOpt = Annotated[bool, typer.Option("--tp-experts", help="split every expert across devices instead of "
                                            "giving each device whole experts")]


def friendly(fn):
    """User mistakes end as one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Glm45vError as e:
            err.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None

    return wrapper


def require(ok: bool, message: str) -> None:
    if not ok:
        raise Glm45vError(message)


def _banner(model: str) -> None:
    if model == "tiny-random":
        err.print("[yellow]tiny-random: a tiny model with random weights; its answers are random.[/yellow]")


def _llm(model: str, device, dtype, tp: int = 1, tp_experts: bool = False, **kwargs):
    from .llm import LLM

    _banner(model)
    with err.status(f"loading {model}"):
        llm = LLM(model, device=device, dtype=dtype, tensor_parallel_size=tp, expert_parallel=not tp_experts,
                  **kwargs)
    err.print(f"[dim]{llm.cfg.model_type} on {llm.device} ({str(llm.dtype).removeprefix('torch.')}), KV cache "
              f"{llm.blocks.num_blocks} blocks x {llm.block_size} = {llm.capacity_tokens} tokens[/dim]")
    return llm


# --- chat --------------------------------------------------------------------------------------------------

CHAT_HELP = "/image PATH attaches an image to the next turn; /reset clears the history; /exit quits; /help"


@app.command()
@friendly
def chat(
    model: ModelOpt = "tiny-random",
    image: Annotated[list[Path] | None, typer.Option("--image", "-i", help="image for the first turn")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="one turn, no prompt loop")] = None,
    no_think: Annotated[bool, typer.Option("--no-think", help="answer without reasoning")] = False,
    max_tokens: int = 1024,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int | None = None,
    max_pixels: int | None = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    tensor_parallel_size: TPOpt = 1,
    tp_experts: TPExpertsOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a machine-readable result")] = False,
) -> None:
    """Chat with images, streaming the answer."""
    from .processor import open_image
    from .sampling import SamplingParams

    require(max_tokens >= 1, f"--max-tokens {max_tokens}: must be >= 1")
    require(temperature >= 0, f"--temperature {temperature}: must be >= 0")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    pending = [open_image(p) for p in image or []]  # fail on a bad image before loading the model
    llm = _llm(model, device, dtype, tensor_parallel_size, tp_experts, max_pixels=max_pixels)
    history: list[dict] = []
    thinking = False if no_think else None

    def turn(text: str) -> dict:
        content = [{"type": "image", "image": im} for im in pending] + [{"type": "text", "text": text}]
        history.append({"role": "user", "content": content})
        result = _stream_turn(llm, history, params, thinking, quiet=as_json, one_shot=prompt is not None)
        history.append({"role": "assistant", "content": result["answer"]})
        pending.clear()
        return result

    if prompt is not None:
        result = turn(prompt)
        if as_json:
            print(json.dumps(result, ensure_ascii=False))
        return
    err.print(f"[dim]{CHAT_HELP}[/dim]")
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt, Ctrl-C clears the line; /exit or Ctrl-D leaves
            err.print()
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/help":
            err.print(CHAT_HELP)
        elif line == "/reset":
            history.clear()
            pending.clear()
            err.print("[dim]history cleared[/dim]")
        elif line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                pending.append(open_image(path))
                err.print(f"[dim]attached {path} to the next turn[/dim]")
            except Glm45vError as e:
                err.print(f"[red]error:[/red] {e}")
        elif line.startswith("/"):
            err.print(f"[red]unknown command {line.split()[0]}[/red]; {CHAT_HELP}")
        else:
            result = turn(line)
            if as_json:
                print(json.dumps(result, ensure_ascii=False))


def _stream_turn(llm, messages, params, thinking, quiet: bool, one_shot: bool) -> dict:
    """Stream one answer: reasoning dim (stderr when one-shot, so stdout pipes the answer), boxes highlighted.
    Ctrl-C stops this answer, not the session."""
    from .output import StreamSplitter, parse_answer

    splitter = StreamSplitter()
    raw, stopped = [], False
    styles = {"reasoning": "dim", "answer": "", "box": "bold cyan"}
    stream = llm.stream({"messages": list(messages)}, params, enable_thinking=thinking)

    def show(pieces):
        if quiet:
            return
        for kind, text in pieces:
            console = err if (one_shot and kind == "reasoning") else out
            console.print(text, style=styles[kind], end="", markup=False)

    try:
        for delta in stream:
            raw.append(delta)
            show(splitter.feed(delta))
    except KeyboardInterrupt:
        stopped = True
        stream.close()
    show(splitter.flush())
    if not quiet:
        out.print()
        if stopped:
            err.print("[dim](stopped)[/dim]")
    parsed = parse_answer("".join(raw))
    result = llm.last_output
    return {"answer": parsed.answer, "reasoning": parsed.reasoning, "boxes": parsed.boxes, "raw": parsed.raw,
            "finish_reason": "abort" if stopped else result.finish_reason,
            "prompt_tokens": result.prompt_token_count, "completion_tokens": len(result.token_ids)}


# --- bench -------------------------------------------------------------------------------------------------


@app.command()
@friendly
def bench(
    model: ModelOpt = "tiny-random",
    load_format: Annotated[str, typer.Option(help="auto (read weights) or dummy (random, no reading)")] = "auto",
    num_layers: Annotated[int | None, typer.Option(help="keep only the first N decoder layers")] = None,
    batch: Annotated[int, typer.Option(help="requests submitted at once")] = 8,
    input_len: int = 128,
    output_len: int = 64,
    images: Annotated[int, typer.Option(help="images per request")] = 0,
    image_size: Annotated[str, typer.Option(help="WxH of each image")] = "448x448",
    block_size: int | None = None,
    kv_cache_gib: float | None = None,
    max_num_batched_tokens: int = 4096,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    tensor_parallel_size: TPOpt = 1,
    tp_experts: TPExpertsOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    roofline: Annotated[bool, typer.Option(help="decode step at batch 1 and --batch vs its byte floor and vs "
                                                "transformers (dummy weights, --num-layers, default 4)")] = False,
) -> None:
    """Throughput and latency: time to first token, inter-token latency, prefill and decode tokens/s."""
    from .bench import parse_size, run_bench

    require(batch >= 1, f"--batch {batch}: must be >= 1")
    if roofline:
        from . import roofline as rl

        result = rl.roofline(model, num_layers or 4, tuple(sorted({1, batch})), input_len, device, dtype)
        print(json.dumps(result)) if as_json else out.print(rl.table(result))
        return
    require(input_len >= 1 and output_len >= 1, "--input-len and --output-len must be >= 1")
    require(images >= 0, f"--images {images}: must be >= 0")
    size = parse_size(image_size)
    llm = _llm(model, device, dtype, tensor_parallel_size, tp_experts, load_format=load_format,
               num_layers=num_layers, block_size=block_size,
               kv_cache_gib=kv_cache_gib, max_num_seqs=max(batch, 1), max_num_batched_tokens=max_num_batched_tokens)
    result = run_bench(llm, batch, input_len, output_len, images, size)
    if as_json:
        print(json.dumps(result))
    else:
        from .bench import table

        out.print(table(result))


# --- caption -----------------------------------------------------------------------------------------------


@app.command()
@friendly
def caption(
    inputs: Annotated[list[str], typer.Argument(help="image files, folders, globs, or .txt files of paths")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="JSONL file, appended as results finish")],
    model: ModelOpt = "tiny-random",
    prompt: str = "Describe this image in one sentence.",
    batch: Annotated[int, typer.Option(help="images in flight at once")] = 16,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="descend into sub-folders")] = False,
    overwrite: Annotated[bool, typer.Option(help="start the output afresh instead of resuming")] = False,
    no_think: Annotated[bool, typer.Option("--no-think")] = True,
    max_tokens: int = 256,
    temperature: float = 0.0,
    max_pixels: int | None = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    tensor_parallel_size: TPOpt = 1,
    tp_experts: TPExpertsOpt = False,
) -> None:
    """Caption many images with continuous batching; resumable JSONL output."""
    from .caption import collect_inputs, run_caption
    from .sampling import SamplingParams

    require(batch >= 1, f"--batch {batch}: must be >= 1")
    require(temperature >= 0, f"--temperature {temperature}: must be >= 0")
    paths = collect_inputs(inputs, recursive)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    llm = _llm(model, device, dtype, tensor_parallel_size, tp_experts, max_pixels=max_pixels, max_num_seqs=batch)
    code = run_caption(llm, paths, out_file, prompt, params, batch, overwrite, thinking=False if no_think else None,
                       console=err)
    raise typer.Exit(code)


# --- info --------------------------------------------------------------------------------------------------


@app.command()
@friendly
def info(model: Annotated[str | None, typer.Option("--model", "-m")] = None, device: DeviceOpt = None,
         dtype: DtypeOpt = None, tensor_parallel_size: TPOpt = 1, tp_experts: TPExpertsOpt = False) -> None:
    """Devices, backend, versions, kernel paths, a model summary and its per-device memory plan."""
    from .info import render_info

    out.print(render_info(model, device, dtype, tensor_parallel_size, not tp_experts))


def main() -> None:
    app()
