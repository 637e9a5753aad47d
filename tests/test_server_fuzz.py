"""A server fuzz: 120 requests (300 in the slow tier) in 20 concurrent streams, good and bad mixed, through the official openai client and
raw HTTP. Every good request ends with the text it gets alone, every bad one with a 4xx and OpenAI's error body,
nothing in the log is a traceback, and afterwards every gauge and the KV cache are back to zero."""

import asyncio
import base64
import io
import json
import logging
import random
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from glm45v_npu import LLM
from glm45v_npu.server.media_policy import MediaPolicy
from tests.serving import Server, data_uri
from tests.tiny import make_vl_checkpoint, random_image

STREAMS = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("server-fuzz")
    make_vl_checkpoint(path, "gqa2-hd32-half-rope", seed=73)
    media = tmp_path_factory.mktemp("fuzz-media")
    random_image(50, 40, 2).save(media / "ok.png")
    srv = Server(LLM(path, block_size=4, kv_cache_gib=0.003, max_num_seqs=12, max_num_batched_tokens=64),
                 media=MediaPolicy(allowed_local_path=media), max_body_bytes=2 * 2**20)
    srv.media = media
    yield srv
    srv.stop()


def _huge_png_uri() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bad_requests(media, huge: str) -> list[tuple[str, str, object, dict]]:
    """(name, path, body (dict, or raw text), headers): one or more of each kind issue 19 names, and more."""
    msg = [{"role": "user", "content": "hi"}]
    part = lambda p: {"messages": [{"role": "user", "content": [p]}]}  # noqa: E731
    url = lambda u: part({"type": "image_url", "image_url": {"url": u}})  # noqa: E731
    chat, comp = "/v1/chat/completions", "/v1/completions"
    return [
        ("image part", chat, part({"type": "image", "image": "/etc/hosts"}), {}),
        ("video part", chat, part({"type": "video", "video": "/etc/hosts"}), {}),
        ("url key", chat, part({"type": "image", "url": str(media / "ok.png")}), {}),
        ("outside the folder", chat, url("/etc/hosts"), {}),
        ("missing file", chat, url("/no/such/file.png"), {}),
        ("a folder", chat, url(str(media)), {}),
        ("NUL in a path", chat, url(str(media / "ok") + "\x00.png"), {}),
        ("remote while off", chat, url("http://169.254.169.254/latest/meta-data"), {}),
        ("ftp", chat, url("ftp://example.com/x.png"), {}),
        ("a 81 Mpx PNG", chat, url(huge), {}),
        ("undecodable", chat, url("data:image/png;base64,aGVsbG8="), {}),
        ("chat_template", chat, {"messages": msg, "chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}}, {}),
        ("template tools", chat, {"messages": msg, "chat_template_kwargs": {"tools": []}}, {}),
        ("top_k huge", comp, {"prompt": "x", "top_k": 2**40}, {}),
        ("stop id outside", comp, {"prompt": "x", "stop_token_ids": [10**9], "min_tokens": 2, "max_tokens": 4}, {}),
        ("5000 digits", comp, '{"prompt": "x", "max_tokens": ' + "7" * 5000 + "}", {}),
        ("deep nesting", comp, '{"prompt": ' + "[" * 50000 + "]" * 50000 + "}", {}),
        ("lone surrogate", chat, '{"messages": [{"role": "user", "content": "\\udc80"}]}', {}),
        ("text/plain", comp, json.dumps({"prompt": "x"}), {"Content-Type": "text/plain"}),
        ("form post", comp, "prompt=x", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("not JSON", comp, "{oops", {}),
        ("not an object", comp, "[1]", {}),
        ("body over the limit", comp, json.dumps({"prompt": "x" * (3 * 2**20)}), {}),
        ("unknown model", comp, {"prompt": "x", "model": "gpt-9"}, {}),
        ("negative max_tokens", comp, {"prompt": "x", "max_tokens": -1}, {}),
        ("n too large", comp, {"prompt": "x", "n": 1000}, {}),
        ("logprobs too many", comp, {"prompt": "x", "logprobs": 50}, {}),
        ("bad role", chat, {"messages": [{"role": "robot", "content": "x"}]}, {}),
        ("content a number", chat, {"messages": [{"role": "user", "content": 5}]}, {}),
        ("ids outside the vocabulary", comp, {"prompt": [1, 2, 10**6]}, {}),
        ("over the context", comp, {"prompt": "x", "max_tokens": 10**6}, {}),
        ("temperature a string", comp, {"prompt": "x", "temperature": "hot"}, {}),
        ("too many stop strings", comp, {"prompt": "x", "stop": ["a"] * 100}, {}),
        ("top_logprobs alone", chat, {"messages": msg, "top_logprobs": 3}, {}),
    ]


def _good_request(rng: random.Random, media) -> tuple[str, dict]:
    """Greedy, so that alone and under load give the same text."""
    common = {"max_tokens": rng.randint(1, 8), "temperature": 0, "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.3:
        common["stop"] = [rng.choice(["a", "e", " "])]
    if rng.random() < 0.3:
        common[rng.choice(["service_tier", "logit_bias", "x_unknown"])] = rng.choice(["z", 3, {"1": 2}])  # ignored
    if rng.random() < 0.45:
        return "/v1/completions", {"prompt": " ".join(rng.choice(["red", "sun", "cat", "sea"])
                                                      for _ in range(rng.randint(1, 12))), **common}
    content = [{"type": "text", "text": rng.choice(["what is it?", "describe", "<|assistant|> hi", "x"])}]
    if rng.random() < 0.4:
        image = random_image(rng.randint(20, 80), rng.randint(20, 80), rng.randint(0, 5))
        content.insert(0, {"type": "image_url", "image_url": {"url": data_uri(image)}})
    elif rng.random() < 0.2:
        content.insert(0, {"type": "image_url", "image_url": {"url": str(media / "ok.png")}})
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], **common}


def _text(path: str, data: dict) -> str:
    choice = data["choices"][0]
    return choice["text"] if path.endswith("/completions") and "text" in choice else choice["message"]["content"]


async def _raw(http, path, body, headers, stream):
    """One request over raw HTTP -> (status, text or error body)."""
    if isinstance(body, str):
        r = await http.post(path, content=body, headers={"Content-Type": "application/json", **headers})
        return r.status_code, r.json()
    if not stream:
        r = await http.post(path, json=body, headers=headers)
        return r.status_code, r.json() if r.status_code != 200 else _text(path, r.json())
    pieces = []
    async with http.stream("POST", path, json={**body, "stream": True}, headers=headers) as r:
        if r.status_code != 200:
            return r.status_code, json.loads(await r.aread())
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                pieces.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return 200, "".join(pieces)


async def _openai(client, path, body):
    """One good request through the official client."""
    extra = {k: body[k] for k in ("ignore_eos",) if k in body}
    known = {k: v for k, v in body.items() if k in ("max_tokens", "temperature", "stop")}
    if path.endswith("chat/completions"):
        r = await client.chat.completions.create(model="glm45v-test", messages=body["messages"], extra_body=extra,
                                                 **known)
        return 200, r.choices[0].message.content
    r = await client.completions.create(model="glm45v-test", prompt=body["prompt"], extra_body=extra, **known)
    return 200, r.choices[0].text


@pytest.mark.parametrize("requests", [120, pytest.param(300, marks=pytest.mark.slow)])
def test_server_fuzz(server, caplog, capsys, requests):
    from openai import AsyncOpenAI

    rng = random.Random(19)
    bad = _bad_requests(server.media, _huge_png_uri())
    plan = []
    for i in range(requests):
        if i < len(bad) or rng.random() < 0.35:
            plan.append(("bad",) + bad[i % len(bad)])
        else:
            path, body = _good_request(rng, server.media)
            plan.append(("good", f"good {i}", path, body, {}))
    rng.shuffle(plan)

    async def run(items):
        sem = asyncio.Semaphore(STREAMS)
        async with (httpx.AsyncClient(base_url=server.url, timeout=120) as http,
                    AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as client):

            async def one(item):
                kind, name, path, body, headers = item
                async with sem:
                    how = rng.random()
                    if kind == "good" and how < 0.3:
                        return await _openai(client, path, body)
                    return await _raw(http, path, body, headers, stream=kind == "good" and how < 0.65)

            return await asyncio.gather(*(one(item) for item in items))

    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        results = asyncio.run(run(plan))
        loaded_s = time.perf_counter() - start
        goods = [(item, r) for item, r in zip(plan, results) if item[0] == "good"]
        alone = []  # then each good one again, on its own
        for item, _ in goods:
            alone.append(asyncio.run(run([item]))[0])
    statuses = {}
    for item, (status, body) in zip(plan, results):
        if item[0] == "bad":
            assert 400 <= status < 500, (item[1], status, body)
            assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], item[1]
            statuses[status] = statuses.get(status, 0) + 1
    for (item, (status, text)), (status_alone, text_alone) in zip(goods, alone):
        assert status == status_alone == 200 and text == text_alone, (item[1], text, text_alone)
    assert server.idle(timeout=30), server.llm.stats()
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, tracebacks[0].getMessage()
    names = ("glm45v_requests_running", "glm45v_requests_waiting", "glm45v_kv_cache_usage_ratio")
    gauges = {f.name: f.samples[0].value for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
              if f.name in names}
    assert gauges == {"glm45v_requests_running": 0, "glm45v_requests_waiting": 0, "glm45v_kv_cache_usage_ratio": 0}
    with capsys.disabled():
        print(f"\nserver fuzz: {len(plan)} requests in {STREAMS} streams in {loaded_s:.1f} s: {len(goods)} good (all "
              f"equal to their run alone), {len(plan) - len(goods)} bad ({len(bad)} kinds; statuses {statuses}), "
              f"0 tracebacks, gauges back to zero")
