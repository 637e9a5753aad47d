"""glm45v serve with the official openai client, under load and disconnects, with bad requests, the API key,
Prometheus metrics, and SIGTERM. The server runs in this process (a uvicorn thread) on 127.0.0.1 at a free
port, except for the SIGTERM test, which runs the real command."""

import asyncio
import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from glm45v_npu import LLM, SamplingParams
from glm45v_npu.parallel.layout import free_port
from glm45v_npu.server.media_policy import MediaPolicy
from tests.cli_cases import cli_env
from tests.serving import ScriptedSampler, Server, data_uri, wait_healthy
from tests.tiny import make_vl_checkpoint, random_image

KEY = "test-key"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve")
    make_vl_checkpoint(path, "gqa2-hd32-half-rope", seed=81)
    return path


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    random_image(40, 30, 5).save(media / "ok.png")
    srv = Server(LLM(ckpt, block_size=4, kv_cache_gib=0.004, max_num_seqs=16), api_key=KEY,
                 media=MediaPolicy(allowed_local_path=media))
    srv.media = media
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY)


def test_chat_with_a_base64_image_equals_llm_generate(client, server, ckpt):
    image = random_image(70, 50, 1)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                             {"type": "text", "text": "what is this?"}]}]
    r = client.chat.completions.create(model="glm45v-test", messages=messages, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 8
    direct = LLM(ckpt, block_size=4, kv_cache_gib=0.004).generate(
        {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": "what is this?"}]}]},
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert r.usage.prompt_tokens == len(direct.prompt_token_ids)
    assert choice.message.content == direct.outputs[0].text  # greedy: token for token (the tiny model never thinks)
    models = client.models.list()
    assert [m.id for m in models.data] == ["glm45v-test"]
    completion = client.completions.create(model="glm45v-test", prompt="Hello", max_tokens=5, temperature=0,
                                           logprobs=2, extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 5 and len(completion.choices[0].logprobs.token_logprobs) == 5
    again = client.chat.completions.create(model="glm45v-test", messages=messages, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the prefix cache served the repeated prompt


def thinking_script(tokenizer) -> ScriptedSampler:
    """<think>, reasoning, </think>, the answer with a box, eos."""
    return ScriptedSampler(tokenizer, "<think>", "let me see", "</think>", "It is ", "<|begin_of_box|>", "42",
                           "<|end_of_box|>")


def test_streaming_splits_reasoning_from_content(client, server, monkeypatch):
    monkeypatch.setattr(server.llm.engine, "sampler", thinking_script(server.llm.engine.processor.tokenizer))
    stream = client.chat.completions.create(model="glm45v-test", messages=[{"role": "user", "content": "q"}],
                                            max_tokens=40, stream=True, stream_options={"include_usage": True})
    reasoning, content, finish, usage, newer = "", "", None, None, ""
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            newer += getattr(c.delta, "reasoning", None) or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert reasoning == "let me see" and content == "It is <|begin_of_box|>42<|end_of_box|>"
    assert finish == "stop" and usage.completion_tokens == len(server.llm.engine.sampler.script)
    whole = client.chat.completions.create(model="glm45v-test", messages=[{"role": "user", "content": "q"}],
                                           max_tokens=40)
    message = whole.choices[0].message
    assert message.content == content and message.model_extra["reasoning_content"] == reasoning
    assert newer == reasoning and message.model_extra["reasoning"] == reasoning  # vLLM's newer name too


def test_what_newer_clients_send_is_understood(client, server):
    """role developer (a system turn), reasoning_effort none (thinking off, as the template's own switch), a
    model retrieved by id; a reasoning_effort the server does not know is a 400 naming it."""
    import openai

    def prompt_tokens(**extra):
        return client.chat.completions.create(model="glm45v-test", max_tokens=1, **extra).usage.prompt_tokens

    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    developer = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert prompt_tokens(messages=developer) == prompt_tokens(messages=system)
    off = prompt_tokens(messages=system, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off != prompt_tokens(messages=system)
    assert prompt_tokens(messages=system, reasoning_effort="none") == off
    assert prompt_tokens(messages=system, reasoning_effort="minimal") == off
    with pytest.raises(openai.BadRequestError) as e:
        prompt_tokens(messages=system, extra_body={"reasoning_effort": "extreme"})
    assert e.value.body["param"] == "reasoning_effort"
    assert client.models.retrieve("glm45v-test").id == "glm45v-test"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_a_hundred_streams_with_twenty_disconnects(server):
    async def one(http, i):
        body = {"model": "glm45v-test", "messages": [{"role": "user", "content": f"request {i}"}],
                "max_tokens": 12, "temperature": 0.8, "seed": i, "stream": True, "ignore_eos": True}
        chunks = 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "done", chunks
                chunks += 1
                if i % 5 == 0 and chunks == 3:  # 20 of 100 leave mid-stream
                    return "left", chunks
        return "cut", chunks

    async def main():
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as http:
            return await asyncio.gather(*(one(http, i) for i in range(100)))

    results = asyncio.run(main())
    assert sum(r == "left" for r, _ in results) == 20
    assert sum(r == "done" for r, _ in results) == 80
    assert server.idle(), server.llm.stats()  # every block free, no request state left


BAD = [
    ("malformed JSON", "/v1/chat/completions", b"{not json", 400, None),
    ("body not an object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("no messages", "/v1/chat/completions", {"max_tokens": 3}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, None),
    ("temperature wrong type", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ("negative max_tokens", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400, "max_tokens"),
    ("top_p out of range", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_p": 7}, 400, "top_p"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
     400, "model"),
    ("undecodable image", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}, 400, None),
    ("remote image while off", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400,
     "messages[0].content[0].image_url"),
    ("local file outside the allowed path", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 400, "messages[0].content[0].image_url"),
    ("prompt + max_tokens over the context", "/v1/completions",
     {"prompt": "hello", "max_tokens": 100000}, 400, None),
    ("tools", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                       "tools": [{"type": "function"}]}, 400, "tools[0]"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("prompt of the wrong type", "/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    ("token id outside the vocabulary", "/v1/completions", {"prompt": [5, 99999]}, 400, None),
    ("body over the limit", "/v1/completions", b"x" * (65 * 2**20), 413, None),
    ("a part type the API does not take", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image", "image": "/etc/hosts"}]}]}, 400, "messages[0].content[0].type"),
    ("a client's own chat template", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
     "chat_template_kwargs": {"chat_template": "{% for i in range(9) %}x{% endfor %}"}}, 400,
     "chat_template_kwargs.chat_template"),
    ("unknown endpoint", "/v1/engines", {}, 404, None),
]


def test_bad_requests_get_their_status_and_an_openai_error_body(server, capsys):
    headers = {"Authorization": f"Bearer {KEY}"}
    rows = []
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        for name, path, body, status, param in BAD:
            r = (http.post(path, content=body, headers={"Content-Type": "application/json"}) if isinstance(body, bytes)
                 else http.post(path, json=body))
            data = r.json()
            assert r.status_code == status, (name, r.status_code, data)
            assert set(data["error"]) == {"message", "type", "param", "code"}, name
            assert "Traceback" not in r.text and data["error"]["message"], name
            if param is not None:
                assert data["error"]["param"] == param, (name, data)
            rows.append((name, status, data["error"]["message"][:70]))
            ok = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})  # still serving
            assert ok.status_code == 200, name
        local = http.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(server.media / "ok.png")}}]}]})
        assert local.status_code == 200  # under the allowed path it works
    with capsys.disabled():
        print(f"\n{len(rows)} kinds of bad request:")
        for name, status, message in rows:
            print(f"  {status} {name}: {message}")
    assert len(rows) >= 12


def test_api_key_on_every_endpoint_but_health(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/completions")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = http.request(method, path, headers=headers, json={})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)


def test_metrics_parse_and_count_the_requests(ckpt):
    from prometheus_client.parser import text_string_to_metric_families

    srv = Server(LLM(ckpt, block_size=4, kv_cache_gib=0.002))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            for i in range(3):
                r = http.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 4, "ignore_eos": True})
                assert r.status_code == 200
            assert http.post("/v1/completions", json={"prompt": "p", "max_tokens": -1}).status_code == 400
            text = http.get("/metrics").text
    finally:
        srv.stop()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert values[("glm45v_requests_total", (("status", "finished"),))] == 3
    assert values[("glm45v_requests_total", (("status", "rejected_400"),))] == 1
    assert values[("glm45v_generation_tokens_total", ())] == 12
    assert values[("glm45v_time_to_first_token_seconds_count", ())] == 3
    assert values[("glm45v_inter_token_latency_seconds_count", ())] == 9
    assert ("glm45v_kv_cache_usage_ratio", ()) in values and ("glm45v_requests_running", ()) in values


def test_the_serve_command_builds_a_server_that_answers(ckpt, monkeypatch):
    """`glm45v serve` as typed, uvicorn's loop replaced by a test client: its options reach the server by name (a
    field added to ServeConfig once shifted the command's positional arguments and every response was a 500)."""
    import uvicorn
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from glm45v_npu.cli import app

    seen = {}

    def run(self):
        with TestClient(self.config.app) as client:
            seen["health"] = client.get("/health").status_code
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            seen["chat"] = client.post("/v1/chat/completions", json=chat).status_code
            seen["big"] = client.post("/v1/chat/completions", json=chat | {"user": "x" * 2**20}).status_code
            pre = client.options("/v1/chat/completions", headers={
                "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            seen["preflight"] = pre.status_code, pre.headers.get("access-control-allow-origin")
            other = client.options("/v1/chat/completions", headers={
                "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
            seen["other origin"] = other.headers.get("access-control-allow-origin")
            seen["page"] = client.get("/").status_code

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # pytest keeps its own Ctrl-C
    r = CliRunner().invoke(app, ["serve", "--model", str(ckpt), "--max-body-mb", "1",
                                 "--allowed-origins", '["https://app.example"]'])
    assert r.exit_code == 0, r.output
    assert seen == {"health": 200, "chat": 200, "big": 413, "preflight": (200, "https://app.example"),
                    "other origin": None, "page": 200}, seen


def test_no_ui_serves_no_page_and_imports_nothing_for_it(ckpt, monkeypatch):
    """--no-ui: / is not served (nor exempt from the key) and the page's module is never imported."""
    import uvicorn
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from glm45v_npu.cli import app

    seen = {}

    def run(self):
        with TestClient(self.config.app) as client:
            seen["page"] = client.get("/").status_code
            seen["page with key"] = client.get("/", headers={"Authorization": f"Bearer {KEY}"}).status_code
            seen["asset"] = client.get("/ui/static/app.js").status_code

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    r = CliRunner().invoke(app, ["serve", "--model", str(ckpt), "--no-ui", "--api-key", KEY])
    assert r.exit_code == 0, r.output
    assert seen == {"page": 401, "page with key": 404, "asset": 401}, seen
    code = ("import sys; from glm45v_npu.server.app import build_app; import glm45v_npu.cli; "
            "print('glm45v_npu.server.routes_ui' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.slow
def test_sigterm_during_streaming_exits_cleanly(tmp_path):
    env = cli_env(tmp_path / "cache")
    port = free_port()
    binary = Path(sys.executable).with_name("glm45v")
    proc = subprocess.Popen([str(binary), "serve", "--port", str(port), "--shutdown-grace", "5"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 3000, "stream": True,
                "ignore_eos": True}
        with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))  # streaming has begun
            start = time.time()
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]  # runs until the grace period ends
        ended = time.time() - start
        finish = [c["finish_reason"] for line in rest[:-1] for c in json.loads(line[6:])["choices"]]
        assert rest[-1] == "data: [DONE]" and finish[-1] == "abort"  # the stream closed properly, as aborted
        assert 3 < ended < 5 + 5
        proc.wait(timeout=60)
        assert proc.returncode == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bench_through_the_server(server):
    from glm45v_npu.apps.bench import run_bench_http

    r = run_bench_http(server.url, KEY, batch=6, input_len=8, output_len=5, images=1, size=(56, 56), concurrency=3,
                       rate=50.0)
    assert r["generated_tokens"] == 30 and r["prompt_tokens"] > 6 * 8
    for key in ("ttft_p50_s", "itl_p50_s", "decode_tokens_per_s", "output_tokens_per_s"):
        assert r[key] > 0, key
    assert server.idle()


def test_chat_with_a_video_url(client, tmp_path):
    from glm45v_npu.inputs.video import write_test_video

    clip = write_test_video(tmp_path / "clip.mp4", 1.0, size=(64, 48))
    uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    r = client.chat.completions.create(model="glm45v-test", max_tokens=3, temperature=0, messages=[
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri}},
                                     {"type": "text", "text": "what moves?"}]}])
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 20


def test_completions_echo_gives_the_prompt_and_its_logprobs(client):
    """What lm-evaluation-harness's log-likelihood tasks read: the prompt's text and tokens first (the first
    without a logprob), then the completion; vLLM's prompt_logprobs carry the same numbers."""
    ids = list(range(40, 52))
    r = client.completions.create(model="glm45v-test", prompt=[ids], max_tokens=1, logprobs=1, echo=True,
                                  temperature=0, extra_body={"prompt_logprobs": 1})
    choice = r.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert choice.text == "".join(lp.tokens) and lp.text_offset[1] == len(lp.tokens[0])
    vllm = choice.model_extra["prompt_logprobs"]
    assert vllm[0] is None and [e[str(t)]["logprob"] for e, t in zip(vllm[1:], ids[1:])] == lp.token_logprobs[1:-1]
    assert all(e[str(t)]["rank"] >= 1 for e, t in zip(vllm[1:], ids[1:]))


def test_prompt_logprobs_are_bounded_whatever_the_prompt_shape():
    from glm45v_npu.errors import FieldError
    from glm45v_npu.server.protocol import CompletionRequest

    for prompt in ("x" * 10_000, [7] * 10_000, [[7] * 10_000], ["x" * 10_000]):
        with pytest.raises(FieldError) as e:
            CompletionRequest(prompt=prompt, prompt_logprobs=20).prepared({}, 100_000)
        assert e.value.field == "prompt_logprobs"
    CompletionRequest(prompt=[[7] * 100], prompt_logprobs=20).prepared({}, 100_000)
