"""What every route reads: the server's state (`ServerState`, one per app: chat rendering, admission to
the engine) and `get_state(request)`.

A leaf of the server package: the app (app.py) builds the state and mounts the routes; the routes
(openai_routes.py, ollama_routes.py) and generation.py read it from here, never from app.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from gearshift.engine.backends.base import Backend
from gearshift.engine.config import EngineConfig
from gearshift.engine.pipeline import chat
from gearshift.engine.pipeline.request_checks import check_token_ids
from gearshift.engine.server import errors
from gearshift.engine.server.lifecycle import Lifecycle
from gearshift.engine.server.metrics import ServerMetrics
from gearshift.engine.server.protocol import ChatMessage

_ENCODE_ON_LOOP_CHARS = 16_384  # shorter texts tokenize in well under a millisecond


@dataclass
class ServerState:
    backend: Backend
    config: EngineConfig
    metrics: ServerMetrics
    lifecycle: Lifecycle
    created: int = field(default_factory=lambda: int(time.time()))
    started: bool = False
    loaded: bool = False  # the backend's start() returned
    stopped: bool = False
    startup_error: BaseException | None = None
    on_fatal: Callable[[], None] | None = None  # set by `gearshift serve`: stop the server

    @property
    def model_name(self) -> str:
        return self.backend.model_name

    def check_model(self, name: str | None, *, ollama: bool = False) -> None:
        if name is None or name == self.model_name:
            return
        if ollama and name.removesuffix(":latest") == self.model_name:
            return
        raise errors.model_not_found(name)

    def vocab_check(self, ids: list[int], param: str) -> None:
        check_token_ids(ids, self.backend.vocab_size, param)

    def health_problem(self) -> str | None:
        """Why the engine can no longer serve (its worker died, or steps keep failing), once it has loaded:
        /health then answers 503 and the kubelet restarts the pod."""
        if not self.loaded or self.stopped or self.backend.ready():
            return None
        return self.backend.broken or "the engine's worker is not running"

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Tokenize; a long text on a worker thread, so that /health (same event loop) still answers."""
        if len(text) <= _ENCODE_ON_LOOP_CHARS:
            return self.backend.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(self.backend.encode, text, add_special_tokens)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool) -> str:
        """The prompt text of chat messages, from the model's own template (pipeline/chat.py)."""
        return chat.render_chat(self.backend, [m.as_dict() for m in messages], add_generation_prompt)[0]

    async def embed(self, inputs: list[list[int]]) -> Any:
        """Admit like a generation (503 while draining or loading), then ask the engine."""
        self.lifecycle.admit()
        self.lifecycle.enter()
        try:
            return await self.backend.embed(inputs)
        finally:
            self.lifecycle.leave()

    async def stop_backend(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.backend.stop()


def get_state(request: Request) -> ServerState:
    return request.app.state.gearshift


def checked_state(request: Request, model: str | None, *, ollama: bool = False) -> ServerState:
    """The app's state, once `model` names the served model (404 otherwise; Ollama also takes `name:latest`)."""
    state = get_state(request)
    state.check_model(model, ollama=ollama)
    return state
