"""The glm45v command: chat, bench, caption, info. Thin: it parses options, builds one EngineConfig (whose fields
and defaults are the engine options of every command) and calls the module that does the work. It imports
neither torch nor the engine until a command runs, so `glm45v --help` is quick."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from .engine.config import EngineConfig
from .errors import FieldError, Glm45vError


class _NoTypeTags:
    """Help without type tags (`<bool>`) on the options typer adds itself: --help and shell completion (our own
    options carry metavars)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
            elif param.param_type_name == "argument":  # its metavar already says what it takes
                param.display_type_rich = lambda ctx: None
        return params


class Command(_NoTypeTags, TyperCommand):
    pass


class Group(_NoTypeTags, TyperGroup):
    pass


app = typer.Typer(cls=Group, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="A lightweight, fast inference runner for GLM-4.5V.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def Opt(*decls: str, help: str, metavar: str = "", **kw: Any) -> Any:  # noqa: N802 (reads like typer.Option)
    return typer.Option(*decls, help=help, metavar=metavar, **kw)


def _default(name: str) -> Any:
    return EngineConfig.__dataclass_fields__[name].default


# --- engine options: every command that runs a model takes them; defaults are EngineConfig's ------------------

ENGINE_OPTIONS: list[tuple[str, Any, Any]] = [
    ("model", Annotated[str, Opt("--model", "-m", metavar="NAME", help="checkpoint folder, hub id, 'tiny-random' "
                                 "(a tiny random model made locally) or a built-in config ('glm-4.5v', with "
                                 "--load-format dummy)")], "tiny-random"),
    ("revision", Annotated[str | None, Opt("--revision", metavar="REV", help="hub branch, tag or commit")], None),
    ("download_dir", Annotated[str | None, Opt("--download-dir", metavar="DIR", help="hub cache folder")], None),
    ("load_format", Annotated[str, Opt("--load-format", metavar="FMT", help="auto (read the weights) or dummy "
                                       "(random, nothing read)")], None),
    ("num_layers", Annotated[int | None, Opt("--num-layers", metavar="N", help="keep only the first N decoder "
                                             "layers (real shapes on a small device)")], None),
    ("device", Annotated[str | None, Opt("--device", metavar="DEV", help="npu, cuda or cpu (default: the first "
                                         "available)")], None),
    ("dtype", Annotated[str, Opt("--dtype", metavar="DTYPE", help="auto (bfloat16 on accelerators, float32 on a "
                                 "CPU), bfloat16, float16 or float32")], "auto"),
    ("seed", Annotated[int, Opt("--seed", metavar="N", help="seed for sampling and dummy weights")], None),
    ("tensor_parallel_size", Annotated[int, Opt("--tensor-parallel-size", "-tp", metavar="N",
                                                help="devices (processes) to split the model over")], None),
    ("enable_expert_parallel", Annotated[bool, Opt("--enable-expert-parallel/--tp-experts",
                                                   help="whole experts per device, or every expert split "
                                                   "across devices")], None),
    ("quantization", Annotated[str, Opt("--quantization", "-q", metavar="auto|fp8|none",
                                        help="auto: as the checkpoint is (FP8, W8A8); fp8: quantize a float "
                                        "checkpoint's decoder at load; none: hold FP8 weights as floats")], None),
    ("block_size", Annotated[int, Opt("--block-size", metavar="N", help="tokens per KV-cache block")], None),
    ("kv_cache_gib", Annotated[float | None, Opt("--kv-cache-gib", metavar="GIB", help="KV-cache size (default: "
                                                 "what memory allows; 0.25 on a CPU)")], None),
    ("gpu_memory_utilization", Annotated[float, Opt("--gpu-memory-utilization", metavar="F",
                                                    help="share of an accelerator's memory to use in all")], None),
    ("enable_prefix_caching", Annotated[bool, Opt("--enable-prefix-caching/--no-enable-prefix-caching",
                                                  help="share KV blocks between prompts with equal prefixes")],
     None),
    ("max_num_seqs", Annotated[int, Opt("--max-num-seqs", metavar="N", help="requests running at once")], None),
    ("max_num_batched_tokens", Annotated[int, Opt("--max-num-batched-tokens", metavar="N",
                                                  help="new tokens per step (longer prompts are chunked)")], None),
    ("max_model_len", Annotated[int | None, Opt("--max-model-len", metavar="N", help="context length (default: "
                                                "the model's)")], None),
    ("max_pixels", Annotated[int | None, Opt("--max-pixels", metavar="N", help="pixel budget per image (larger "
                                             "images are scaled down)")], None),
    ("generation_config", Annotated[str, Opt("--generation-config", metavar="auto|vllm",
                                             help="auto: sampling defaults from the checkpoint's "
                                             "generation_config.json; vllm: ignore it")], None),
    ("enforce_eager", Annotated[bool, Opt("--enforce-eager", help="no decode graphs")], None),
    ("dist_timeout_s", Annotated[float, Opt("--dist-timeout-s", metavar="S", help="with several ranks: a "
                                            "collective that waits longer fails, naming the rank that died")], None),
]

SAMPLING_OPTIONS: list[tuple[str, Any]] = [
    ("max_tokens", Annotated[int | None, Opt("--max-tokens", metavar="N", help="tokens to generate at most")]),
    ("temperature", Annotated[float | None, Opt("--temperature", metavar="T", help="0 = greedy (default: the "
                                                "checkpoint's generation config, else 1)")]),
    ("top_p", Annotated[float | None, Opt("--top-p", metavar="P", help="nucleus sampling")]),
    ("top_k", Annotated[int | None, Opt("--top-k", metavar="K", help="sample from the K most likely tokens")]),
    ("min_p", Annotated[float | None, Opt("--min-p", metavar="P", help="drop tokens below P x the most likely")]),
    ("repetition_penalty", Annotated[float | None, Opt("--repetition-penalty", metavar="F",
                                                       help="> 1 discourages repeating prompt or output tokens")]),
    ("stop", Annotated[list[str] | None, Opt("--stop", metavar="TEXT", help="stop at this text (repeatable)")]),
]


def _inject(fn, target: str, options: list[tuple[str, Any, Any]], collect):
    """Add `options` to fn's signature (typer reads it) and pass fn's `target` parameter what `collect` makes of
    their values."""
    sig = inspect.signature(fn, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != target]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
             for name, annotation, default in options]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs[target] = collect({name: kwargs.pop(name) for name, _, _ in options})
        return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + added)
    return wrapper


def engine_options(fn):
    """The command gets `engine: EngineConfig` built from the engine options (defaults: EngineConfig's)."""
    options = [(name, annotation, _default(name) if default is None else default)
               for name, annotation, default in ENGINE_OPTIONS]

    def collect(values: dict) -> EngineConfig:
        values["dtype"] = None if values["dtype"] == "auto" else values["dtype"]
        with _flag_errors():
            config = EngineConfig(**values)
        if os.environ.get("RANK", "0") != "0":  # a torchrun follower: its part of the model before any command work
            from .engine.worker import follow
            from .parallel.cluster import Torchrun

            if Torchrun.from_env() is not None:
                follow(config)
        return config

    return _inject(fn, "engine", options, collect)


def sampling_options(**defaults: Any):
    """The command gets `sampling: dict`: the sampling options given, over the command's own defaults; the
    engine fills the rest from the checkpoint's generation config."""

    def deco(fn):
        def collect(values: dict) -> dict:
            from .sampling_params import SamplingParams

            given = {k: v for k, v in values.items() if v is not None}
            with _flag_errors():  # checked before the model loads
                for name, value in given.items():
                    SamplingParams(**{name: value})
            return {**defaults, **given}

        return _inject(fn, "sampling", [(name, annotation, None) for name, annotation in SAMPLING_OPTIONS], collect)

    return deco


@contextmanager
def _flag_errors() -> Iterator[None]:
    """An option's bad value, named as the flag the user typed."""
    try:
        yield
    except FieldError as e:
        raise Glm45vError(f"--{e.field.replace('_', '-')} {e.value}: {e.why}") from None


def friendly(fn):
    """User mistakes end as one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Glm45vError as e:
            err.print(Text.assemble(("error: ", "red"), str(e)))  # as text: messages may hold [brackets]
            raise typer.Exit(2) from None

    return wrapper


def require(ok: bool, message: str) -> None:
    if not ok:
        raise Glm45vError(message)


def _llm(config: EngineConfig):
    from .llm import LLM

    if config.model == "tiny-random":
        err.print("[yellow]tiny-random: a tiny model with random weights; its answers are random.[/yellow]")
    with err.status(f"loading {escape(config.model)}"):
        llm = LLM.from_config(config)
    s = llm.stats()
    err.print(f"[dim]{llm.model_config.model_type} on {llm.device} ({str(llm.dtype).removeprefix('torch.')}), KV "
              f"cache {s.num_blocks} blocks x {s.block_size} = {s.num_blocks * s.block_size} tokens[/dim]")
    return llm


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"glm45v {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, Opt("--version", help="print the version and exit", callback=_version,
                                 is_eager=True)] = False,
    log_level: Annotated[str, Opt("--log-level", metavar="LEVEL", help="debug, info, warning or error (info "
                                  "shows the KV-cache budget line by line)")] = "warning",
) -> None:
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        err.print(Text.assemble(("error: ", "red"), f"--log-level {log_level}: expected debug, info, warning or error"))
        raise typer.Exit(2)
    from rich.logging import RichHandler

    handler = RichHandler(console=err, show_path=False, show_time=False)
    logger = logging.getLogger("glm45v_npu")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


DRAW_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}

# --- chat --------------------------------------------------------------------------------------------------

@app.command(cls=Command)
@friendly
@engine_options
@sampling_options(max_tokens=1024)
def chat(
    words: Annotated[list[str] | None, typer.Argument(metavar="[PROMPT [IMAGE...]]", show_default=False,
                                                      help="one turn, as `ollama run` takes it: a prompt, then "
                                                      "image paths")] = None,
    image: Annotated[list[Path] | None, Opt("--image", "-i", metavar="PATH", help="image for the first turn "
                                            "(repeatable)")] = None,
    video: Annotated[list[Path] | None, Opt("--video", metavar="PATH", help="video for the first turn "
                                            "(repeatable)")] = None,
    prompt: Annotated[str | None, Opt("--prompt", "-p", metavar="TEXT", help="one turn, no prompt loop")] = None,
    system_prompt: Annotated[str | None, Opt("--system-prompt", metavar="TEXT", help="system message")] = None,
    think: Annotated[bool | None, Opt("--think/--no-think", help="reason before answering (default: the chat "
                                      "template's, on for GLM-4.5V)", show_default=False)] = None,
    as_json: Annotated[bool, Opt("--json", help="print a machine-readable result (boxes in pixels)")] = False,
    draw: Annotated[Path | None, Opt("--draw", metavar="OUT.png", help="write the image with the answer's "
                                     "grounding boxes drawn (each answer that has boxes)")] = None,
    engine: EngineConfig = None,
    sampling: dict = None,
) -> None:
    """Chat with images, streaming the answer."""
    from .apps.caption import media_kind
    from .apps.chat import ChatSession, checked

    words = list(words or [])
    require(draw is None or draw.suffix.lower() in DRAW_SUFFIXES,
            f"--draw {draw}: name an image file ({', '.join(sorted(DRAW_SUFFIXES))})")
    require(not (words and prompt is not None), "give the prompt either as --prompt or as an argument, not both")
    if words:
        prompt = words[0]
        image = [*(image or []), *(Path(w) for w in words[1:] if media_kind(w) == "image")]
        video = [*(video or []), *(Path(w) for w in words[1:] if media_kind(w) == "video")]
    # fail on a bad file before loading the model
    pending = [checked("image", p) for p in image or []] + [checked("video", p) for p in video or []]
    llm = _llm(engine)
    session = ChatSession(llm, llm.engine.default_sampling_params(**sampling), system_prompt, think, as_json,
                          one_shot=prompt is not None, out=out, err=err, draw=str(draw) if draw else None)
    session.pending = pending
    if prompt is not None:
        session.turn(prompt)
    else:
        session.loop()


@app.command(cls=Command)
@friendly
@engine_options
def bench(
    batch: Annotated[int, Opt("--batch", metavar="N", help="requests submitted at once")] = 8,
    input_len: Annotated[int, Opt("--input-len", metavar="N", help="prompt tokens per request")] = 128,
    output_len: Annotated[int, Opt("--output-len", metavar="N", help="generated tokens per request")] = 64,
    images: Annotated[int, Opt("--images", metavar="N", help="images per request")] = 0,
    image_size: Annotated[str, Opt("--image-size", metavar="WxH", help="size of each image (and video frame)")] = (
        "448x448"),
    videos: Annotated[int, Opt("--videos", metavar="N", help="videos per request (moving shapes, made locally)")] = 0,
    video_seconds: Annotated[float, Opt("--video-seconds", metavar="S", help="length of each video")] = 2.0,
    as_json: Annotated[bool, Opt("--json", help="print JSON instead of a table")] = False,
    roofline: Annotated[bool, Opt("--roofline", help="decode step at batch 1 and --batch vs its byte floor and "
                                  "vs transformers (dummy weights, --num-layers, default 4)")] = False,
    url: Annotated[str | None, Opt("--url", metavar="URL", help="run the workload against `glm45v serve` at URL "
                                   "(e.g. http://127.0.0.1:8000) instead of in this process")] = None,
    api_key: Annotated[str | None, Opt("--api-key", metavar="KEY", help="with --url: the server's key",
                                       envvar="GLM45V_API_KEY")] = None,
    concurrency: Annotated[int | None, Opt("--concurrency", metavar="N", help="with --url: requests in flight "
                                           "at most (default: --batch)")] = None,
    request_rate: Annotated[float | None, Opt("--request-rate", metavar="R", help="with --url: requests started "
                                              "per second, Poisson (default: all at once)")] = None,
    json_schema: Annotated[Path | None, Opt("--json-schema", metavar="FILE", help="hold every answer to this JSON "
                                            "schema (run after the same workload without it)")] = None,
    engine: EngineConfig = None,
) -> None:
    """Throughput and latency: time to first token, inter-token latency, prefill and decode tokens/s."""
    from .apps.bench import parse_size, read_json_schema, run_bench, run_bench_http, table

    require(batch >= 1, f"--batch {batch}: must be >= 1")
    if url:
        require(input_len >= 1 and output_len >= 1, "--input-len and --output-len must be >= 1")
        require(concurrency is None or concurrency >= 1, f"--concurrency {concurrency}: must be >= 1")
        require(request_rate is None or request_rate > 0, f"--request-rate {request_rate}: must be > 0")
        result = run_bench_http(url.rstrip("/"), api_key, batch, input_len, output_len, images,
                                parse_size(image_size), concurrency or batch, request_rate)
        return _show(result, table, as_json)
    if roofline:
        from .apps import roofline as rl

        result = rl.roofline(engine.model, engine.num_layers or 4, tuple(sorted({1, batch})), input_len,
                             engine.device, engine.dtype)
        return _show(result, rl.table, as_json)
    require(input_len >= 1 and output_len >= 1, "--input-len and --output-len must be >= 1")
    require(images >= 0, f"--images {images}: must be >= 0")
    require(videos >= 0, f"--videos {videos}: must be >= 0")
    require(video_seconds > 0, f"--video-seconds {video_seconds}: must be > 0")
    size = parse_size(image_size)
    schema = read_json_schema(json_schema) if json_schema is not None else None
    llm = _llm(replace(engine, max_num_seqs=max(batch, engine.max_num_seqs)))
    _show(run_bench(llm, batch, input_len, output_len, images, size, videos, video_seconds, schema), table, as_json)


def _show(result: dict, table, as_json: bool) -> None:
    """A result as one JSON line (for scripts) or as its rich table."""
    if as_json:
        print(json.dumps(result))
    else:
        out.print(table(result))


# --- caption -----------------------------------------------------------------------------------------------


@app.command(cls=Command)
@friendly
@engine_options
@sampling_options(max_tokens=256, temperature=0.0)
def caption(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT...", help="image files, folders, globs, or .txt "
                                                "files of paths")],
    out_file: Annotated[Path, Opt("--out", "-o", metavar="FILE", help="JSONL file, appended as results finish")],
    prompt: Annotated[str, Opt("--prompt", "-p", metavar="TEXT", help="what to ask about each image")] = (
        "Describe this image in one sentence."),
    system_prompt: Annotated[str | None, Opt("--system-prompt", metavar="TEXT", help="system message")] = None,
    batch: Annotated[int, Opt("--batch", metavar="N", help="images in flight at once")] = 16,
    recursive: Annotated[bool, Opt("--recursive", "-r", help="descend into sub-folders")] = False,
    overwrite: Annotated[bool, Opt("--overwrite/--resume", help="start the output afresh, or skip the paths "
                                   "already in it")] = False,
    think: Annotated[bool, Opt("--think/--no-think", help="reason before answering (slower)")] = False,
    draw: Annotated[Path | None, Opt("--draw", metavar="DIR", help="write each image whose answer has grounding "
                                     "boxes, with them drawn, into DIR")] = None,
    shard: Annotated[str | None, Opt("--shard", metavar="I/N", help="caption only the inputs whose path hashes to "
                                     "shard I of N, into OUT.parts/shard-I-of-N.jsonl (a later run without "
                                     "--shard captions what is missing and merges the parts into OUT)")] = None,
    engine: EngineConfig = None,
    sampling: dict = None,
) -> None:
    """Caption many images with continuous batching; resumable JSONL output, shardable over replicas."""
    from .apps import caption as cap

    require(batch >= 1, f"--batch {batch}: must be >= 1")
    require(draw is None or not draw.is_file(), f"--draw {draw}: is a file; name a folder")
    paths = cap.collect_inputs(inputs, recursive)
    part = cap.parse_shard(shard) if shard else None
    merging = part is None and cap.parts_dir(out_file).is_dir()
    target, mine = out_file, paths
    if part is not None:
        target, mine = cap.part_file(out_file, *part), [p for p in paths if cap.shard_of(p, part[1]) == part[0]]
    elif merging:
        target = cap.parts_dir(out_file) / cap.REST
    if part is not None or merging:
        finished = cap.done_elsewhere(out_file, target)
        mine = [p for p in mine if p not in finished]
    before = cap.shard_rows(paths, out_file) if merging else []
    code = 0
    if overwrite or cap.pending(mine, target):  # nothing to caption: no model to load
        llm = _llm(replace(engine, max_num_seqs=batch))
        params = llm.engine.default_sampling_params(**sampling)
        code = cap.run_caption(llm, mine, target, prompt, params, batch, overwrite, thinking=think,
                               system_prompt=system_prompt, console=err, draw=draw)
    else:
        err.print(f"nothing to caption: every input of {'this shard' if part else 'the run'} is done", markup=False)
    if merging and code == 0:
        cap.merge_parts(paths, out_file, err, before)
    raise typer.Exit(code)


# --- serve -------------------------------------------------------------------------------------------------


@app.command(cls=Command)
@friendly
@engine_options
def serve(
    host: Annotated[str, Opt("--host", metavar="ADDR", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, Opt("--port", metavar="N", help="port to listen on")] = 8000,
    api_key: Annotated[str | None, Opt("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' "
                                       "(all endpoints but /health)", envvar="GLM45V_API_KEY")] = None,
    served_model_name: Annotated[str | None, Opt("--served-model-name", metavar="NAME",
                                                 help="the model name clients send (default: --model)")] = None,
    max_waiting: Annotated[int | None, Opt("--max-waiting", metavar="N", help="past N waiting requests, answer "
                                           "503 with Retry-After instead of queueing")] = None,
    max_body_mb: Annotated[int, Opt("--max-body-mb", metavar="MB", help="largest request body")] = 64,
    allowed_local_media_path: Annotated[Path | None, Opt("--allowed-local-media-path", metavar="DIR",
                                                         help="image URLs may name local files under DIR")] = None,
    allow_remote_media: Annotated[bool, Opt("--allow-remote-media", help="fetch http(s) media URLs of public "
                                            "hosts (10 s, 32 MiB limits)")] = False,
    allow_private_media_hosts: Annotated[bool, Opt("--allow-private-media-hosts", help="with --allow-remote-media: "
                                                   "also hosts on loopback, private and link-local addresses")] = False,
    shutdown_grace: Annotated[float, Opt("--shutdown-grace", metavar="S", help="on SIGTERM/Ctrl-C, seconds "
                                         "running requests may finish before the rest are aborted")] = 30.0,
    allowed_origins: Annotated[list[str] | None, Opt("--allowed-origins", metavar="ORIGIN", help="let web pages "
                                                     "of ORIGIN call the API (CORS; repeat it, '*' for any, or "
                                                     "vLLM's JSON list); off by default")] = None,
    no_ui: Annotated[bool, Opt("--no-ui", help="serve the API only, without the chat page at /")] = False,
    engine: EngineConfig = None,
) -> None:
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)
    and a chat page at /."""
    import uvicorn

    from .server.app import build_app
    from .server.media_policy import MediaPolicy
    from .server.state import ServeConfig

    require(1 <= port <= 65535, f"--port {port}: expected 1..65535")
    require(max_waiting is None or max_waiting >= 1, f"--max-waiting {max_waiting}: must be >= 1")
    require(max_body_mb >= 1, f"--max-body-mb {max_body_mb}: must be >= 1")
    require(allow_remote_media or not allow_private_media_hosts,
            "--allow-private-media-hosts needs --allow-remote-media")
    require(allowed_local_media_path is None or allowed_local_media_path.is_dir(),
            f"--allowed-local-media-path {allowed_local_media_path}: not a folder")
    llm = _llm(engine)
    config = ServeConfig(served_model_name or engine.model, api_key=api_key, max_waiting=max_waiting,
                         max_body_bytes=max_body_mb * 2**20,
                         media=MediaPolicy(allowed_local_media_path, allow_remote_media, allow_private_media_hosts),
                         allowed_origins=_origins(allowed_origins or []), ui=not no_ui)
    app = build_app(llm, config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """Stop accepting; running requests have the grace period, then end as aborted (streams still
            close properly) a moment before uvicorn would cut their connections."""
            if not self.should_exit:
                timer = threading.Timer(max(0.0, shutdown_grace - 1.0), app.state.engine.abort_all)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    err.print(f"[dim]serving {escape(config.model_name)} on http://{escape(host)}:{port}/v1"
              + ("" if no_ui else f"; the chat page at http://{escape(host)}:{port}/") + "[/dim]")
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal it handled: a graceful stop exits 0
        signal.signal(sig, lambda *_: None)
    Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_grace,
                          log_level="warning")).run()
    llm.close()


def _origins(given: list[str]) -> tuple[str, ...]:
    """--allowed-origins values: each an origin, or vLLM's JSON list of them."""
    out = []
    for value in given:
        if value.lstrip().startswith("["):
            try:
                items = json.loads(value)
            except json.JSONDecodeError:
                items = None
            require(isinstance(items, list) and all(isinstance(o, str) for o in items),
                    f"--allowed-origins {value}: expected a JSON list of strings")
            out += items
        else:
            out.append(value)
    return tuple(out)


# --- info --------------------------------------------------------------------------------------------------


@app.command(cls=Command)
@friendly
def info(
    model: Annotated[str | None, Opt("--model", "-m", metavar="NAME", help="also summarise this model (a hub id "
                                     "fetches its config files only)")] = None,
    revision: Annotated[str | None, Opt("--revision", metavar="REV", help="hub branch, tag or commit")] = None,
    device: Annotated[str | None, Opt("--device", metavar="DEV", help="npu, cuda or cpu")] = None,
    dtype: Annotated[str, Opt("--dtype", metavar="DTYPE", help="for the memory plan")] = "auto",
    tensor_parallel_size: Annotated[int, Opt("--tensor-parallel-size", "-tp", metavar="N",
                                             help="devices for the memory plan")] = 1,
    enable_expert_parallel: Annotated[bool, Opt("--enable-expert-parallel/--tp-experts",
                                                help="whole experts per device, or split experts")] = True,
    quantization: Annotated[str, Opt("--quantization", "-q", metavar="auto|fp8|none",
                                     help="weights as the engine would hold them")] = "auto",
    device_memory: Annotated[str | None, Opt("--device-memory", metavar="SIZE", help="memory per device for the "
                                             "plan, e.g. 141GiB (default: this machine's device)")] = None,
) -> None:
    """Devices, backend, versions, kernel paths, a model summary and its per-device memory plan."""
    from .apps.info import render_info

    out.print(render_info(model, device, None if dtype == "auto" else dtype, tensor_parallel_size,
                          enable_expert_parallel, revision, quantization, device_memory))


def main() -> None:
    app()
