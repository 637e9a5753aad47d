"""A glm45v server in the test's process (a uvicorn thread on 127.0.0.1, a free port), for tests that talk HTTP."""

import asyncio
import base64
import io
import socket
import threading
import time

import httpx
import uvicorn

from glm45v_npu.engine.sampler import Sampled
from glm45v_npu.server.app import build_app
from glm45v_npu.server.state import ServeConfig


class Server:
    """`send_buffer`: bytes of kernel send buffer per connection (its sockets inherit the listening one's), so that
    a client that reads nothing blocks the server's writes within that much, not the few MB loopback grows to."""

    def __init__(self, llm, send_buffer: int | None = None, **config):
        self.llm = llm
        self.app = build_app(llm, ServeConfig("glm45v-test", **config))
        listener = socket.socket()
        if send_buffer is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        listener.bind(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, args=([listener],), daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def step_s(self) -> float:
        """The engine's mean step so far (host and device): the unit of the bystander bound."""
        s = self.llm.stats()
        return (s.host_s + s.device_s) / max(1, s.steps)

    def idle(self, timeout=30.0) -> bool:
        """Wait until the engine holds no request and every block is free."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.llm.stats()
            if s.requests == 0 and s.free_blocks == s.num_blocks and not self.app.state.engine.queues:
                return True
            time.sleep(0.05)
        return False


class ScriptedSampler:
    """Samples a fixed script, so the tiny random model writes a known answer: each part is text (tokenized) or a
    special token's name in TOKEN_IDS; eos follows. `delay_s` per step makes a stream slow enough to stop."""

    def __init__(self, tokenizer, *parts: str, delay_s: float = 0.0):
        from glm45v_npu.testing.tiny_random import TOKEN_IDS

        self.script = [t for part in parts for t in ([TOKEN_IDS[part]] if part in TOKEN_IDS
                                                    else tokenizer.encode(part, add_special_tokens=False))]
        self.script.append(TOKEN_IDS["<|endoftext|>"])
        self.delay_s = delay_s

    def __call__(self, logits, params, generators, history, prompt_lens=None, suppress=None, allowed=None):
        if self.delay_s:
            time.sleep(self.delay_s)
        tokens = [self.script[min(len(h) - n, len(self.script) - 1)] for h, n in zip(history, prompt_lens)]
        return Sampled(tokens, [-0.5] * len(tokens), [1] * len(tokens), [None] * len(tokens))


def script(llm, *parts: str, delay_s: float = 0.0) -> ScriptedSampler:
    """From now on `llm` writes this script (see ScriptedSampler)."""
    llm.engine.sampler = ScriptedSampler(llm.engine.processor.tokenizer, *parts, delay_s=delay_s)
    return llm.engine.sampler


def record_prompts(llm, monkeypatch) -> list:
    """The prompts `llm` renders from now on, in order (its processor's encode, watched)."""
    processor = llm.engine.processor
    seen, encode = [], processor.encode

    def recording(request, enable_thinking=None):
        enc = encode(request, enable_thinking)
        seen.append(enc.prompt)
        return enc

    monkeypatch.setattr(processor, "encode", recording)
    return seen


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    """Until a server started in another process answers /health with 200; past the timeout, fail saying so."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url}/health did not answer 200 within {timeout:.0f} s")


class Outlasted(AssertionError):
    """The probe ended after a bystander stream: nothing was measured beside it."""


async def bystanders(url: str, probe, n: int = 6, tokens: int = 300, delay: float = 0.3):
    """n streams of `tokens` tokens; `probe(http)` starts `delay` s in. -> (largest gap of any stream, the
    probe's result, seconds the probe took). The probe must end while every stream still runs: a probe that lands
    after the streams could not show a stall."""
    async def one(http):
        body = {"prompt": "count with me", "max_tokens": tokens, "ignore_eos": True, "stream": True}
        times = []
        async with http.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
        return max(b - a for a, b in zip(times[1:], times[2:])), times[-1]

    async def side(http):
        if probe is None:
            return None, 0.0, 0.0
        await asyncio.sleep(delay)
        t = time.perf_counter()
        result = await probe(http)
        return result, time.perf_counter() - t, time.perf_counter()

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        *streams, (result, took, ended) = await asyncio.gather(*(one(http) for _ in range(n)), side(http))
    if probe is not None:
        if ended >= min(last for _, last in streams):
            raise Outlasted(f"the probe ({took:.2f} s) outlasted the bystanders: give them more tokens")
    return max(gap for gap, _ in streams), result, took


def beside(srv: Server, probe, **streams) -> tuple:
    """The probe run beside bystander streams, their bound checked against a calm run of the same streams:
    largest gap <= calm + 2 engine steps (the serving issues' bound). -> (result, seconds, calm gap, loaded gap).
    A gap of a few ms over the bound comes and goes on a busy 2-core machine (a collection, the client's own
    work, another process's turn; a probe slowed past the streams' end by such a process measures nothing), so a
    miss is measured again, up to three times in all; a probe that stalls the engine misses every time."""
    for _ in range(3):
        calm, _, _ = asyncio.run(bystanders(srv.url, None, **streams))
        try:
            loaded, result, took = asyncio.run(bystanders(srv.url, probe, **streams))
        except Outlasted as e:
            miss = e
            continue
        if loaded <= calm + 2 * srv.step_s():
            return result, took, calm, loaded
        miss = AssertionError(f"bystanders' largest gap {loaded * 1e3:.1f} ms beside the probe, {calm * 1e3:.1f} ms "
                              f"calm (bound: calm + 2 steps of {srv.step_s() * 1e3:.1f} ms)")
    raise miss


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
