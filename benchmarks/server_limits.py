"""What hostile traffic costs a `glm45v serve` (tiny model, in this process): log bytes per bad request, and the
server's RSS after many distinct schemas and many distinct media items.

    python benchmarks/server_limits.py [--schemas 2000] [--media 50000] [--bad 40] [--concurrency 16]

Each schema is a small distinct JSON schema (a compiled grammar each, cached within the grammar cache's byte
budget); each media item a distinct 28x28 PNG (its own digest: prefix-cache keys, vision work). RSS is read from
/proc/self/status before and after each phase, and the log bytes are what the server's loggers wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_server(path: str):
    import uvicorn

    from glm45v_npu import LLM
    from glm45v_npu.parallel.layout import free_port
    from glm45v_npu.server.app import build_app
    from glm45v_npu.server.state import ServeConfig

    llm = LLM(path, max_num_seqs=16, kv_cache_gib=0.02)
    port = free_port()
    app = build_app(llm, ServeConfig("bench"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}", llm


def png(i: int) -> str:
    from PIL import Image

    img = Image.new("RGB", (28, 28), ((i * 7) % 256, (i // 256) % 256, (i // 65536) % 256))
    img.putpixel((i % 28, (i // 28) % 28), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def send_all(url: str, bodies, concurrency: int) -> dict:
    import httpx

    statuses: dict[int, int] = {}
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def worker(http):
        while not queue.empty():
            body = queue.get_nowait()
            try:
                status = (await http.post("/v1/chat/completions", json=body)).status_code
            except httpx.HTTPError as e:  # the server dropped the connection
                status = type(e).__name__
            statuses[status] = statuses.get(status, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return statuses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemas", type=int, default=2000)
    ap.add_argument("--media", type=int, default=50_000)
    ap.add_argument("--bad", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    from glm45v_npu.testing.tiny_random import write_vl_checkpoint

    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    for name in ("glm45v_npu", "uvicorn.error", "uvicorn.access", ""):
        logging.getLogger(name).addHandler(handler)
    with tempfile.TemporaryDirectory() as folder:
        write_vl_checkpoint(Path(folder))
        server, url, llm = start_server(folder)
        user = [{"role": "user", "content": "hi"}]
        results = {"rss_start_mib": rss_mib()}

        deep: dict = {"type": "string"}
        for _ in range(300):
            deep = {"type": "array", "items": deep}
        before = len(logged.getvalue())
        bad = [{"messages": user, "max_tokens": 2, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": deep}}}] * args.bad
        results["bad_statuses"] = asyncio.run(send_all(url, bad, 4))
        results["log_bytes_per_bad_request"] = (len(logged.getvalue()) - before) / max(1, args.bad)

        schemas = [{"messages": user, "max_tokens": 2, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {f"k{i}": {"type": "integer"}},
                                    "required": [f"k{i}"]}}}} for i in range(args.schemas)]
        t = time.perf_counter()
        results["schema_statuses"] = asyncio.run(send_all(url, schemas, args.concurrency))
        results["schema_seconds"] = time.perf_counter() - t
        results["rss_after_schemas_mib"] = rss_mib()
        grammars = llm.engine._grammars
        results["grammar_cache_mib"] = (getattr(grammars, "cached_bytes", 0) or 0) / 2**20 if grammars else 0

        media = ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png(i)}},
                                                             {"type": "text", "text": "?"}]}], "max_tokens": 1}
                 for i in range(args.media))
        t = time.perf_counter()
        results["media_statuses"] = asyncio.run(send_all(url, list(media), args.concurrency))
        results["media_seconds"] = time.perf_counter() - t
        results["rss_after_media_mib"] = rss_mib()
        server.should_exit = True
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
