"""glm45v bench: B requests at once; time to first token, inter-token latency, prefill and decode tokens/s."""

from __future__ import annotations

import random
import resource
import time

import torch
from rich.table import Table

from .. import platform
from ..errors import Glm45vError
from ..sampling_params import SamplingParams, StructuredOutputsParams


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise Glm45vError(f"--image-size {text}: expected WxH, e.g. 448x448") from None
    if w < 1 or h < 1:
        raise Glm45vError(f"--image-size {text}: both sides must be >= 1")
    return w, h


def read_json_schema(path) -> dict:
    """--json-schema FILE: a JSON schema object, or an error naming the file."""
    import json

    try:
        schema = json.loads(path.read_text())
    except OSError as e:
        raise Glm45vError(f"--json-schema {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Glm45vError(f"--json-schema {path}: not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise Glm45vError(f"--json-schema {path}: expected a JSON schema object")
    StructuredOutputsParams(json=schema, origin=f"--json-schema {path}")  # refused here if it is no schema
    return schema


def _random_image(size: tuple[int, int], seed: int):
    """A W x H image of random pixels (a worst case for the vision tower's input, nothing downloaded)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


def _requests(llm, batch: int, input_len: int, images: int, size: tuple[int, int], seed: int, videos: int = 0,
              video_seconds: float = 2.0, folder: str | None = None) -> list[dict]:
    from ..inputs.video import write_test_video

    rng = random.Random(seed)
    cfg = llm.model_config
    special = set(llm.engine.processor.eos_token_ids) | {cfg.image_token_id, cfg.video_token_id}
    vocab = [t for t in range(min(cfg.text.vocab_size, 30000)) if t not in special]
    out = []
    for i in range(batch):
        ids = [rng.choice(vocab) for _ in range(input_len)]
        pics = []
        for k in range(images):
            ids.insert(k, cfg.image_token_id)
            pics.append(_random_image(size, seed * 1000 + i * 10 + k))
        clips = []
        for k in range(videos):
            ids.insert(images + k, cfg.video_token_id)
            clips.append(str(write_test_video(f"{folder}/{seed}-{i}-{k}.mp4", video_seconds, size=size,
                                              seed=seed * 1000 + i * 10 + k)))
        out.append({"prompt_token_ids": ids, "images": pics, "videos": clips})
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run_bench(llm, batch: int, input_len: int, output_len: int, images: int, size: tuple[int, int],
              videos: int = 0, video_seconds: float = 2.0, json_schema: dict | None = None) -> dict:
    """With `json_schema`, every request's answer is held to it, and the same workload runs first without it (same
    process): the mask's host cost per step beside a baseline."""
    if json_schema is None:
        return _run(llm, batch, input_len, output_len, images, size, videos, video_seconds)
    base = _run(llm, batch, input_len, output_len, images, size, videos, video_seconds)
    grammar = StructuredOutputsParams(json=json_schema, origin="--json-schema")
    out = _run(llm, batch, input_len, output_len, images, size, videos, video_seconds, grammar)
    return {**out, "baseline": {k: base[k] for k in ("host_s_per_step", "device_s_per_step", "steps",
                                                     "decode_tokens_per_s", "generated_tokens")}}


def _run(llm, batch: int, input_len: int, output_len: int, images: int, size: tuple[int, int], videos: int,
         video_seconds: float, grammar: StructuredOutputsParams | None = None) -> dict:
    import tempfile

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True, structured_outputs=grammar)
    with tempfile.TemporaryDirectory(prefix="glm45v-bench-") as folder:  # test videos, read as requests are added
        llm.generate(_requests(llm, 1, min(input_len, 16), images, size, 1, videos, video_seconds, folder),
                     SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
        requests = _requests(llm, batch, input_len, images, size, 0, videos, video_seconds, folder)
        platform.reset_peak_memory(llm.device)
        platform.synchronize(llm.device)
        before = llm.stats()
        start = time.perf_counter()
        outs = llm.generate(requests, params)
        platform.synchronize(llm.device)
        total = time.perf_counter() - start
    bad = [o.error for o in outs if o.error]
    if bad:
        raise Glm45vError(f"bench request rejected: {bad[0]}")
    times = [o.metrics.token_times[0] for o in outs]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    peak = platform.peak_memory(llm.device)
    if llm.device.type == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = llm.stats()
    steps = max(1, stats.steps - before.steps)
    return {
        "model": llm.model_config.source, "device": str(llm.device), "dtype": str(llm.dtype).removeprefix("torch."),
        "batch": batch, "input_len": input_len, "output_len": output_len, "images_per_request": images,
        "videos_per_request": videos,
        **latency_summary(times, prompt_tokens, total),
        "peak_memory_bytes": peak, "peak_memory_is_process_rss": llm.device.type == "cpu",
        "kv_cache_blocks": stats.num_blocks, "kv_cache_tokens": stats.num_blocks * stats.block_size,
        "preemptions": stats.preemptions, "steps": steps,
        "host_s_per_step": (stats.host_s - before.host_s) / steps,
        "device_s_per_step": (stats.device_s - before.device_s) / steps,
        "grammar_s_per_step": (stats.grammar_s - before.grammar_s) / steps,
    }


def latency_summary(times: list[list[float]], prompt_tokens: int, total: float, generated: int | None = None
                    ) -> dict:
    """From each request's token arrival times (seconds since it was sent): TTFT, ITL and throughputs. Over
    HTTP a chunk can carry several tokens (or none, while a character's bytes are incomplete): `generated`
    then comes from the server's usage counts."""
    ttft = [t[0] for t in times if t]
    itl = [b - a for t in times for a, b in zip(t, t[1:])]
    generated = sum(len(t) for t in times) if generated is None else generated
    last_first = max(ttft)
    decode_time = max(t[-1] for t in times if t) - last_first
    return {
        "prompt_tokens": prompt_tokens, "generated_tokens": generated, "total_s": total,
        "ttft_mean_s": sum(ttft) / len(ttft), "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99),
        "itl_p50_s": _pct(itl, 0.5), "itl_p99_s": _pct(itl, 0.99),
        "prefill_tokens_per_s": prompt_tokens / last_first,
        "decode_tokens_per_s": (generated - len(times)) / decode_time if decode_time > 0 else float("nan"),
        "output_tokens_per_s": generated / total,
    }


def run_bench_http(url: str, api_key: str | None, batch: int, input_len: int, output_len: int, images: int,
                   size: tuple[int, int], concurrency: int, rate: float | None) -> dict:
    """The same workload through a running `glm45v serve` (streamed /v1/completions, or chat when images
    are sent): at most `concurrency` requests in flight, started at `rate` per second (all at once if None)."""
    import asyncio
    import base64
    import io
    import json

    import httpx

    rng = random.Random(0)

    def body(i: int) -> tuple[str, dict]:
        words = " ".join(rng.choice(["apple", "river", "stone", "light", "cloud", "green"]) for _ in range(input_len))
        common = {"max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True,
                  "stream_options": {"include_usage": True}}
        if not images:
            return "/v1/completions", {**common, "prompt": words}
        parts = []
        for k in range(images):
            buf = io.BytesIO()
            _random_image(size, i * 10 + k).save(buf, "PNG")
            parts.append({"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": [
            *parts, {"type": "text", "text": words}]}]}

    async def one(http, sem, path, payload):
        async with sem:
            start = time.perf_counter()
            times, usage = [], {}
            async with http.stream("POST", path, json=payload) as r:
                if r.status_code != 200:
                    raise Glm45vError(f"{url}{path}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    for c in chunk.get("choices", []):
                        if c.get("text") or (c.get("delta") or {}).get("content") or c.get("logprobs"):
                            times.append(time.perf_counter() - start)
            return times, usage

    async def main():
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None) as http:
            await one(http, sem, *body(-1))  # warm-up
            tasks = []
            start = time.perf_counter()
            for i in range(batch):
                tasks.append(asyncio.create_task(one(http, sem, *body(i))))
                if rate:
                    await asyncio.sleep(rng.expovariate(rate))
            results = await asyncio.gather(*tasks)
            return results, time.perf_counter() - start

    try:
        results, total = asyncio.run(main())
    except httpx.HTTPError as e:
        raise Glm45vError(f"--url {url}: {type(e).__name__}: {e}") from None
    times = [t for t, _ in results]
    prompt = sum(u.get("prompt_tokens", 0) for _, u in results)
    generated = sum(u.get("completion_tokens", 0) for _, u in results)
    return {"model": url, "device": "server", "dtype": "-", "batch": batch, "input_len": input_len,
            "output_len": output_len, "images_per_request": images, "concurrency": concurrency, "rate": rate,
            **latency_summary(times, prompt, total, generated)}


def table(r: dict) -> Table:
    t = Table(title=f"glm45v bench: batch {r['batch']}, {r['input_len']} in / {r['output_len']} out, "
              f"{r['images_per_request']} image(s) and {r.get('videos_per_request', 0)} video(s) per request, "
              f"{r['device']} {r['dtype']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    rows = [
        ("time to first token (mean / p50 / p99)",
         f"{ms(r['ttft_mean_s'])} / {ms(r['ttft_p50_s'])} / {ms(r['ttft_p99_s'])}"),
        ("inter-token latency (p50 / p99)", f"{ms(r['itl_p50_s'])} / {ms(r['itl_p99_s'])}"),
        ("prefill throughput", f"{r['prefill_tokens_per_s']:.0f} tok/s"),
        ("decode throughput", f"{r['decode_tokens_per_s']:.0f} tok/s"),
        ("output throughput", f"{r['output_tokens_per_s']:.0f} tok/s"),
        ("total", f"{r['total_s']:.2f} s"),
    ]
    if "steps" in r:  # run in this process: what the engine saw
        rows[-1:-1] = [
            ("peak memory" + (" (process RSS)" if r["peak_memory_is_process_rss"] else " (device)"),
             f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"),
            ("KV cache", f"{r['kv_cache_blocks']} blocks = {r['kv_cache_tokens']} tokens"),
            ("per step: host (schedule, inputs, stop rules) / device (model + sampling)",
             f"{ms(r['host_s_per_step'])} / {ms(r['device_s_per_step'])} over {r['steps']} steps"),
            ("preemptions", str(r["preemptions"])),
        ]
    if "baseline" in r:  # --json-schema: the same workload without the grammar, run first
        b = r["baseline"]
        rows[-1:-1] = [
            ("grammar masks per step (host, inside device)", ms(r["grammar_s_per_step"])),
            ("without the grammar: host / device per step",
             f"{ms(b['host_s_per_step'])} / {ms(b['device_s_per_step'])} over {b['steps']} steps"),
            ("without the grammar: decode throughput", f"{b['decode_tokens_per_s']:.0f} tok/s"),
        ]
    for row in rows:
        t.add_row(*row)
    return t
