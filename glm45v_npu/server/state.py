"""What every route of one server shares: its configuration, the engine loop, the metrics and the sampling
defaults. build_app makes one and puts it at app.state.server; routes read it from their request."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field

from fastapi import Request

from .engine_loop import EngineLoop
from .media_policy import MediaPolicy
from .metrics import Metrics
from .responses import ResponseStore


@dataclass
class ServeConfig:
    model_name: str
    _: KW_ONLY  # the rest by name: a field added in the middle must not shift a caller's arguments
    api_key: str | None = None
    max_waiting: int | None = None
    max_body_bytes: int = 64 * 2**20
    write_timeout_s: float = 30.0  # a client that reads nothing of its response for this long is dropped
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed by CORS ("*": any); none: CORS off
    ui: bool = True  # the chat page at / (routes_ui.py)
    media: MediaPolicy = field(default_factory=MediaPolicy)


@dataclass
class ServerState:
    llm: object
    config: ServeConfig
    metrics: Metrics
    engine: EngineLoop
    defaults: dict  # the checkpoint's sampling defaults, under SamplingParams' names
    responses: ResponseStore = field(default_factory=ResponseStore)  # /v1/responses stored for previous_response_id

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len


def state_of(request: Request) -> ServerState:
    return request.app.state.server
