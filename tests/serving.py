"""A glm45v server in the test's process (a uvicorn thread on 127.0.0.1, a free port), for tests that talk HTTP."""

import base64
import io
import threading
import time

import httpx
import uvicorn

from glm45v_npu.parallel.layout import free_port
from glm45v_npu.server.app import build_app
from glm45v_npu.server.state import ServeConfig


class Server:
    def __init__(self, llm, **config):
        self.llm = llm
        self.port = free_port()
        self.app = build_app(llm, ServeConfig("glm45v-test", **config))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def idle(self, timeout=30.0) -> bool:
        """Wait until the engine holds no request and every block is free."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.llm.stats()
            if s.requests == 0 and s.free_blocks == s.num_blocks and not self.app.state.engine.queues:
                return True
            time.sleep(0.05)
        return False


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


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
