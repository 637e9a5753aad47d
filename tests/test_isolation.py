"""One request never stalls another (issue 33): what a hostile client sends is bounded or refused before it costs
the others anything, with bystander streams measured beside each probe; caches and queues are bounded; errors a
client causes are 400s in the project's words, logged once per kind; a dropped LLM cleans up after itself.

The bystander bound is the issue's: the largest gap between a bystander's tokens stays within two engine steps of
the same streams' largest gap in a calm run of the same test."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from glm45v_npu import LLM, SamplingParams
from glm45v_npu.sampling_params import MAX_CHOICES, MAX_SCHEMA_DEPTH, MAX_SCHEMA_NODES
from tests.serving import Server, beside, data_uri
from tests.tiny import make_vl_checkpoint, random_image

USER = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("isolation")
    make_vl_checkpoint(path, "gqa2-hd32-half-rope", seed=33)
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    srv = Server(LLM(ckpt, block_size=4, kv_cache_gib=0.004, max_num_seqs=16, max_model_len=2048))
    yield srv
    srv.stop()


def _post(body, path="/v1/chat/completions"):
    """The probe, its body encoded now: a client encoding megabytes on its event loop would delay its own reads of
    the bystanders' tokens (the server runs in this process)."""
    content = json.dumps(body).encode()

    async def probe(http):
        return await http.post(path, content=content, headers={"content-type": "application/json"})
    return probe


def _refused(r, field: str, words: str = "limit"):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field, err
    assert words in err["message"], err["message"]
    assert ".cc:" not in err["message"] and "Check failed" not in err["message"]


def _chat(**extra):
    return {"messages": USER, "max_tokens": 4, **extra}


def _wide_schema(n: int, bad_type: bool = False) -> dict:
    props = {f"p{i}": {"type": "string"} for i in range(n)}
    if bad_type:
        props["p7"] = {"type": "stringg"}
    return {"type": "object", "properties": props}


def _deep_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def _json_schema(schema):
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


# (each probe runs beside six streams for ~5 s: the fast tier keeps one of them, CI's slow tier runs them all)
PROBES = {
    "a json_schema of 100,000 properties, one type misspelt": pytest.param(
        _chat(response_format=_json_schema(_wide_schema(100_000, bad_type=True))),
        "response_format.json_schema.schema", f"more than {MAX_SCHEMA_NODES} values", marks=pytest.mark.slow),
    "a json_schema of 30,000 properties": pytest.param(
        _chat(response_format=_json_schema(_wide_schema(30_000))),
        "response_format.json_schema.schema", f"more than {MAX_SCHEMA_NODES} values", marks=pytest.mark.slow),
    "json_schema items nested 300 deep": pytest.param(
        _chat(response_format=_json_schema(_deep_schema(300))),
        "response_format.json_schema.schema", f"deeper than {MAX_SCHEMA_DEPTH}", marks=pytest.mark.slow),
    "100,000 guided_choice choices": pytest.param(
        _chat(guided_choice=[f"c{i}" for i in range(100_000)]), "guided_choice", f"more than {MAX_CHOICES} choices",
        marks=pytest.mark.slow),
    "a 33-byte regex that unrolls to 10,000 repetitions": pytest.param(
        _chat(guided_regex="([a-zA-Z]{1,100}){1,100}ZZZZZZZZZZ"), "guided_regex", "unrolls", marks=pytest.mark.slow),
    "n: 64 with 20 logprobs and 1000 tokens, not streamed (the issue's 90 MB body)": pytest.param(
        _chat(n=64, logprobs=True, top_logprobs=20, max_tokens=1000), "top_logprobs", "limit of",
        marks=pytest.mark.slow),
    "a whole answer of 8 x 2000 tokens x 21 logprobs": pytest.param(
        _chat(n=8, logprobs=True, top_logprobs=20, max_tokens=2000), "top_logprobs", "limit of",
        marks=pytest.mark.slow),
    "top_logprobs: 21": pytest.param(_chat(logprobs=True, top_logprobs=21), "top_logprobs", "0..20",
                                     marks=pytest.mark.slow),
    "a 1 MB prompt with tools and tool_choice required": (
        {"messages": [{"role": "user", "content": "x" * 1_000_000}], "max_tokens": 4, "tool_choice": "required",
         "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
        "messages", "over the model's context"),
}


@pytest.mark.parametrize("case", [pytest.param(getattr(c, "values", c), marks=getattr(c, "marks", ()), id=name)
                                  for name, c in PROBES.items()])
def test_oversized_requests_are_refused_up_front_beside_bystanders(server, case):
    body, field, words = case
    r, took, _, _ = beside(server, _post(body))
    _refused(r, field, words)
    assert took < 5.0, took


def test_a_large_body_of_many_small_values_is_refused_by_the_checking_process(server):
    """25,000 one-letter text parts: valid in every field, but 125,000 JSON values to decode; refused with the
    limit named, by the process that reads large bodies apart."""
    from glm45v_npu.server.body_check import MAX_BODY_OBJECTS

    parts = [{"type": "text", "text": "a"}] * 25_000
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": parts}], "max_tokens": 4})
    assert r.status_code == 400 and f"more than {MAX_BODY_OBJECTS} objects" in r.json()["error"]["message"], r.text


def test_a_large_body_past_its_checking_time_is_refused_and_the_next_one_is_read(server, monkeypatch):
    from glm45v_npu.server import body_check

    big = {"messages": USER, "max_tokens": 2, "user": "x" * 100_000}  # over 64 KiB, read apart
    monkeypatch.setattr(body_check, "BODY_CHECK_S", 0.0)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json=big)
    assert r.status_code == 400 and "longer than 0 s to read and check" in r.json()["error"]["message"], r.text
    monkeypatch.setattr(body_check, "BODY_CHECK_S", 30.0)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json=big)
    assert r.status_code == 200, r.text


def test_a_library_message_reaches_the_client_in_the_projects_words(server):
    """xgrammar's own complaint (with its C++ path and a timestamp) is cut to the complaint, naming the field."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json=_chat(guided_grammar="root ::= undefined_rule"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_grammar", r.text
    message = r.json()["error"]["message"]
    assert ".cc:" not in message and not message.split(": ", 1)[1].startswith("["), message


def test_a_grammar_too_costly_per_token_ends_its_request_and_no_other(ckpt, monkeypatch):
    """A grammar within the size limits can still be slow to mask: past the per-step budget (here made tiny) its
    request ends with an error naming the limit, and the step does not wait on it again."""
    from glm45v_npu.engine import grammar

    monkeypatch.setattr(grammar, "MASK_BUDGET_S", 0.0)
    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004)
    from glm45v_npu.sampling_params import StructuredOutputsParams

    slow = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate(["a", "b"], [slow, plain])
    assert "the limit is 0 ms" in outs[0].error and outs[0].outputs[0].finish_reason == "abort"
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 8


def test_the_grammar_cache_is_bounded_in_bytes(ckpt, monkeypatch):
    from glm45v_npu.engine import grammar
    from glm45v_npu.sampling_params import StructuredOutputsParams

    llm = LLM(ckpt, block_size=4, kv_cache_gib=0.004)
    grammars = llm.engine.grammars
    one = grammars.prepare(StructuredOutputsParams(json=_wide_schema(3)), []).compiled.memory_size_bytes
    monkeypatch.setattr(grammar, "CACHE_BYTES", 12 * one)  # a grammar may take a quarter: 3 of these
    for i in range(40):
        grammars.prepare(StructuredOutputsParams(json=_wide_schema(3 + i % 3) | {"title": str(i)}), [])
        assert grammars.cached_bytes <= 12 * one
    assert 6 <= len(grammars._cache) <= 12, len(grammars._cache)


# --- media ------------------------------------------------------------------------------------------------


def _video_bytes(path, seconds: float, size=(32, 24), fps: int = 10) -> bytes:
    from glm45v_npu.inputs.video import write_test_video

    return write_test_video(path, seconds, fps=fps, size=size).read_bytes()


def _video_part(data: bytes) -> dict:
    import base64

    return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}}


@pytest.mark.slow
def test_video_decoding_stops_when_its_client_leaves(server, tmp_path, monkeypatch):
    """A long video's decoding is cancelled between frames once its client is gone (the issue: it ran on for
    103 s of CPU), and the media pool is free again at once."""
    from glm45v_npu.inputs import video

    decoded = []
    real = video._check_frame

    def slow(frame, name, index):
        decoded.append(index)
        time.sleep(0.01)  # 600 frames: 6 s of decoding
        return real(frame, name, index)

    monkeypatch.setattr(video, "_check_frame", slow)
    body = {"messages": [{"role": "user", "content": [_video_part(_video_bytes(tmp_path / "v.mp4", 60)),
                                                      {"type": "text", "text": "what happens?"}]}], "max_tokens": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1.0)
    time.sleep(1.0)  # the watcher sees the disconnect within 0.25 s, the decoder at its next frame
    count = len(decoded)
    time.sleep(1.0)
    assert len(decoded) == count and count < 400, (count, len(decoded))
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


def test_a_stream_that_changes_frame_size_is_refused_at_that_frame(server, tmp_path, monkeypatch):
    """An MPEG-TS whose header says small frames and whose stream switches to large ones: every decoded frame is
    checked (here with a lower limit than the real 8192 x 8192), the video is named, and it is a 400."""
    import av
    import numpy as np

    from glm45v_npu.inputs import video

    monkeypatch.setattr(video, "MAX_FRAME_PIXELS", 40 * 40)
    parts = []
    for size in ((16, 16), (64, 64)):  # two TS streams back to back: a resolution switch mid-way
        buf = io.BytesIO()
        with av.open(buf, "w", format="mpegts") as out:
            s = out.add_stream("mpeg2video", rate=10)
            s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
            for i in range(10):
                frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), i * 20, np.uint8), format="rgb24")
                for packet in s.encode(frame):
                    out.mux(packet)
            for packet in s.encode():
                out.mux(packet)
        parts.append(buf.getvalue())
    body = {"messages": [{"role": "user", "content": [_video_part(parts[0] + parts[1])]}], "max_tokens": 2}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert "64x64" in r.json()["error"]["message"] and "video 1" in r.json()["error"]["message"]


def test_a_demuxer_failure_of_any_kind_is_a_400_naming_the_video(server, tmp_path, monkeypatch):
    """The raw H.264 stream of the issue made the demuxer raise PermissionError, which came back a 500."""
    import av

    real = av.container.InputContainer.decode

    def refusing(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(av.container.InputContainer, "decode", refusing)
    try:
        body = {"messages": [{"role": "user", "content": [_video_part(_video_bytes(tmp_path / "p.mp4", 1))]}],
                "max_tokens": 2}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    finally:
        monkeypatch.setattr(av.container.InputContainer, "decode", real)
    assert r.status_code == 400, r.text
    assert "video 1" in r.json()["error"]["message"] and "PermissionError" in r.json()["error"]["message"]


@pytest.mark.slow
def test_text_requests_do_not_wait_behind_other_requests_images(server, monkeypatch):
    """Every media worker busy with slow images (2 s each): a request without media is encoded in its own lane
    and answers as soon as the engine runs it."""
    from glm45v_npu.inputs import processor

    real = processor.preprocess_images

    def slow(*args, **kwargs):
        time.sleep(2.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(processor, "preprocess_images", slow)
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": data_uri(random_image(30, 30, 1))}}, {"type": "text", "text": "and?"}]}], "max_tokens": 2}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            heavy = [asyncio.create_task(http.post("/v1/chat/completions", json=image)) for _ in range(8)]
            await asyncio.sleep(0.3)
            t = time.perf_counter()
            r = await http.post("/v1/chat/completions", json=_chat())
            took = time.perf_counter() - t
            return r, took, await asyncio.gather(*heavy)

    r, took, heavy = asyncio.run(main())
    assert r.status_code == 200 and took < 1.5, took
    assert all(h.status_code == 200 for h in heavy)


def test_a_wide_request_leaves_running_slots_to_others(server):
    """n as large as the server's running slots: it takes half of them while others wait, so a request that
    comes after it starts at once instead of after all of its completions."""
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            wide = asyncio.create_task(http.post("/v1/completions", json={
                "prompt": "x", "n": 16, "max_tokens": 300, "ignore_eos": True}))
            await asyncio.sleep(0.5)
            t = time.perf_counter()
            first = None
            async with http.stream("POST", "/v1/completions", json={"prompt": "y", "max_tokens": 4,
                                                                   "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and first is None:
                        first = time.perf_counter() - t
            return first, (await wide)

    first, wide = asyncio.run(main())
    assert wide.status_code == 200 and len(wide.json()["choices"]) == 16
    assert first < 20 * server.step_s() + 0.5, first  # started within a few steps, not after 300 x 2 rounds


# --- slow and greedy clients -------------------------------------------------------------------------------


@pytest.mark.slow
def test_clients_that_never_read_are_dropped_and_free_their_slots(ckpt, monkeypatch):
    """Streams opened and never read: each request is ended once its queued outputs pass the bound, long before its
    1500 tokens, and the connection is closed after the write timeout, the stream never finished; the server is idle
    again and serves others. (The server's send buffers are 16 KiB here: on loopback they grow to 4 MB, more than
    these streams write, and no write would ever wait.)"""
    from glm45v_npu.server import engine_loop

    monkeypatch.setattr(engine_loop, "MAX_QUEUED_OUTPUTS", 16)
    srv = Server(LLM(ckpt, block_size=4, kv_cache_gib=0.004, max_num_seqs=8), send_buffer=16 * 1024,
                 write_timeout_s=2.0)
    socks = []
    try:
        body = json.dumps({"prompt": "x" * 200, "max_tokens": 1500, "ignore_eos": True, "stream": True,
                           "logprobs": 5}).encode()
        for _ in range(4):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads nothing fills this
            s.connect(("127.0.0.1", srv.port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            socks.append(s)
        deadline = time.time() + 30
        while srv.llm.stats().steps == 0 and time.time() < deadline:  # the requests are in
            time.sleep(0.01)
        assert srv.idle(timeout=30), srv.llm.stats()  # every request ended: its slot and blocks are free
        assert srv.llm.stats().steps < 1000, srv.llm.stats()  # ended by the bound, not by their 1500 tokens
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "y", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        time.sleep(3.0)  # past the write timeout: the server closed each connection whose client still read nothing
        for s in socks:
            s.settimeout(5)
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except ConnectionResetError:  # the server closed it with unsent data
                pass
            assert data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in data, data[-300:]
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_a_body_in_tiny_chunks_is_read_no_further_than_the_limit(ckpt):
    srv = Server(LLM(ckpt, block_size=4, kv_cache_gib=0.002), max_body_bytes=64 * 1024)
    try:
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        sent, answer = 0, b""
        s.settimeout(0.001)
        try:
            while sent < 300 * 1024 and not answer:
                s.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n")  # 1 KiB chunks
                sent += 1024
                try:
                    answer = s.recv(4096)
                except (TimeoutError, BlockingIOError):
                    pass
        except OSError:  # the server closed the connection at the limit
            pass
        s.settimeout(5)
        try:
            answer = answer or s.recv(4096)
        except OSError:
            pass
        assert sent <= 64 * 1024 + 256 * 1024, sent  # what the kernel's buffers held when the server stopped
        assert b" 413 " in answer.split(b"\r\n")[0], answer[:200]
    finally:
        s.close()
        srv.stop()


# --- errors a client causes ----------------------------------------------------------------------------------


def test_errors_a_client_causes_are_logged_once_per_kind(server, monkeypatch, caplog):
    """40 requests that each raise inside the server: a RecursionError is a 400 (nesting in the request), any
    other failure a 500; each kind is logged once with its traceback and then only counted."""
    from glm45v_npu.server import protocol

    def deep(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(protocol.ChatCompletionRequest, "tool_use", deep)
    caplog.set_level(logging.WARNING, logger="glm45v_npu")
    rs = [httpx.post(server.url + "/v1/chat/completions", json=_chat(), timeout=30) for _ in range(40)]
    assert all(r.status_code == 400 for r in rs), rs[0].text
    records = [r for r in caplog.records if r.name == "glm45v_npu"]
    assert len(records) <= 2, [r.getMessage() for r in records]  # the first, and the count at 10
    assert sum(len(r.getMessage()) + len(r.exc_text or "") for r in records) < 2000


# --- a dropped LLM -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_dropped_tp2_llm_cleans_up_and_another_one_works(ckpt):
    """LLM(tensor_parallel_size=2) dropped without close(): its worker, process group and threads go with it, and
    the next one in the same process gives the same tokens."""
    import multiprocessing

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    threads_before = {t.name for t in threading.enumerate()}
    before = set(multiprocessing.active_children())  # e.g. a server's checking processes, still up

    def children():
        return set(multiprocessing.active_children()) - before

    llm = LLM(ckpt, tensor_parallel_size=2, block_size=4, kv_cache_gib=0.002)
    first = llm.generate("same tokens", params)[0].outputs[0].token_ids
    del llm
    gc.collect()
    deadline = time.time() + 30
    while time.time() < deadline and children():
        time.sleep(0.2)
    assert not children()
    left = {t.name for t in threading.enumerate()} - threads_before
    assert not {name for name in left if name.startswith("glm45v")}, left
    llm = LLM(ckpt, tensor_parallel_size=2, block_size=4, kv_cache_gib=0.002)
    try:
        assert llm.generate("same tokens", params)[0].outputs[0].token_ids == first
    finally:
        llm.close()
    assert not children()
