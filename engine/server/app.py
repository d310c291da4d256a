"""The FastAPI app in front of either engine: `build_app(backend, config)`.

The app starts and stops the backend with its lifespan, owns a per-app metrics registry and the
lifecycle (admission, drain), and mounts the OpenAI and Ollama routes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from gearshift.engine import __version__
from gearshift.engine.backends.base import Backend
from gearshift.engine.config import EngineConfig
from gearshift.engine.errors import InvalidRequestError
from gearshift.engine.server import errors
from gearshift.engine.server.lifecycle import Lifecycle
from gearshift.engine.server.limits import RequestGuard, api_key_error
from gearshift.engine.server.metrics import CONTENT_TYPE, ServerMetrics
from gearshift.engine.server.protocol import DetokenizeRequest, TokenizeRequest
from gearshift.engine.server.state import ServerState, get_state

log = logging.getLogger("gearshift.server")


def require_api_key(request: Request) -> None:
    err = api_key_error(request.headers.get("authorization", ""), get_state(request).config.api_key)
    if err is not None:
        raise err


def build_app(backend: Backend, config: EngineConfig, *, load_in_background: bool = True) -> FastAPI:
    """`load_in_background`: answer /health while the model loads (a server); False: the lifespan
    startup waits for the model (in-process clients that want it loaded before their first call)."""
    from gearshift.engine.server import completions_routes, ollama_routes, openai_routes, responses_routes

    state = ServerState(backend=backend, config=config,
                        metrics=ServerMetrics(config.served_model_name or backend.model_name, backend.stats),
                        lifecycle=Lifecycle(backend.ready))
    # /docs and /openapi.json are routes of ours below: behind the API key when one is set.
    app = FastAPI(title="gearshift", version=__version__, lifespan=_lifespan(state, load_in_background),
                  docs_url=None, openapi_url=None,
                  description="OpenAI- and Ollama-compatible serving for the paged and gguf engines.")
    app.state.gearshift = state
    app.add_middleware(RequestGuard, max_body=config.max_request_body, read_timeout=config.read_timeout,
                       api_key=config.api_key)
    errors.install(app)
    app.include_router(_ops_router(state))
    app.include_router(_api_router(app, state))
    app.include_router(completions_routes.router, dependencies=[Depends(require_api_key)])
    app.include_router(openai_routes.router, dependencies=[Depends(require_api_key)])
    app.include_router(ollama_routes.router, dependencies=[Depends(require_api_key)])
    app.include_router(responses_routes.router, dependencies=[Depends(require_api_key)])
    return app


def _lifespan(state: ServerState,
              load_in_background: bool) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start the backend with the app (in the background: /health answers at once, /ready and generation
    once loaded) and stop it with the app."""
    backend = state.backend

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.started:
            # A second lifespan of the same app (in-process test clients may run one per thread) must
            # not start the engine again: two workers on one llama.cpp context corrupt it.
            yield
            return
        state.started = True
        task = asyncio.create_task(_load(state, backend))
        if not load_in_background:
            await task
            if state.startup_error is not None:
                raise state.startup_error
        try:
            yield
        finally:
            await task
            if state.startup_error is None:
                await state.stop_backend()

    return lifespan


async def _load(state: ServerState, backend: Backend) -> None:
    """Load the model; a failure is kept in state.startup_error (and ends the server via on_fatal)."""
    t0 = time.monotonic()
    log.info("loading the model (%s engine); /ready answers 503 until it is done", backend.name)
    try:
        await backend.start()
        state.loaded = True
        log.info("model loaded in %.1fs; /ready answers 200", time.monotonic() - t0)
    except Exception as e:  # one line for the user; `gearshift serve` exits 2 with it
        state.startup_error = e
        log.error("the model failed to load: %s", e)
        if state.on_fatal is not None:
            state.on_fatal()


def _ops_router(state: ServerState) -> APIRouter:
    """/health, /ready and /metrics: open to probes and scrapers, no API key."""
    backend = state.backend
    ops = APIRouter()

    @ops.get("/health")
    async def health() -> Any:
        problem = state.health_problem()
        if problem is not None:
            return errors.error_response_plain(503, problem, code="engine_broken")
        return {"status": "ok"}

    @ops.get("/ready")
    async def ready() -> JSONResponse:
        if state.lifecycle.draining:
            return errors.error_response_plain(503, "the server is shutting down")
        if not backend.ready():
            return errors.error_response_plain(503, "the model is not ready yet")
        return JSONResponse({"status": "ready", "model": backend.model_name, "engine": backend.name})

    @ops.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return ops


def _api_router(app: FastAPI, state: ServerState) -> APIRouter:
    """The model list, tokenizer endpoints and API docs, behind the API key."""
    backend = state.backend
    api = APIRouter(dependencies=[Depends(require_api_key)])

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": backend.model_name, "object": "model", "created": state.created, "owned_by": "gearshift",
            "root": backend.model_name, "parent": None, "max_model_len": backend.max_model_len}]}

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("send exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            text = state.render_chat(body.messages, body.add_generation_prompt)
            ids = await state.encode(text, add_special_tokens=False)
        else:
            ids = await state.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": backend.max_model_len, "tokens": ids}

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        state.check_model(body.model)
        state.vocab_check(body.tokens, "tokens")
        return {"prompt": backend.decode(body.tokens)}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @api.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="gearshift API")

    return api
