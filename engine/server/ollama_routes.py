"""Ollama's API on both engines: `POST /api/chat`, `POST /api/generate` (NDJSON streaming, the default),
`GET /api/tags`, `GET /api/ps`, `GET /api/version`, so tools that speak Ollama (Open WebUI, editors) work.

Durations are in nanoseconds, as Ollama reports them. Errors are Ollama's `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from gearshift.engine.errors import InvalidRequestError
from gearshift.engine.outputs import RequestOutput
from gearshift.engine.pipeline import chat as chat_pipeline
from gearshift.engine.pipeline import embeddings as embedding
from gearshift.engine.pipeline import structured
from gearshift.engine.pipeline.tools import parse_tools
from gearshift.engine.sampling_params import SamplingParams
from gearshift.engine.server.errors import APIError
from gearshift.engine.server.framing import NDJSON, ndjson_line
from gearshift.engine.server.generation import Generation, answer
from gearshift.engine.server.protocol import ChatMessage
from gearshift.engine.server.state import ServerState, checked_state, get_state
from pydantic import BaseModel, ConfigDict

router = APIRouter()
# The Ollama API level these routes follow; VS Code's agent mode refuses servers below 0.6.4.
OLLAMA_API_VERSION = "0.6.4"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class OllamaOptions(_Strict):
    # Ollama's own defaults where it has them.
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.0
    num_predict: int = -1  # -1: until the model stops (or the context is full)
    seed: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    num_ctx: int | None = None  # checked against the served context; it cannot be changed per request
    # Accepted and ignored (llama.cpp runtime knobs that do not change the output): Ollama clients send them.
    num_keep: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    num_thread: int | None = None
    use_mmap: bool | None = None
    repeat_last_n: int | None = None


class OllamaMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


class _OllamaRequest(_Strict):
    model: str
    stream: bool = True
    options: OllamaOptions | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: str | int | float | None = None

    def sampling_params(self, context_length: int) -> SamplingParams:
        o = self.options or OllamaOptions()
        if o.num_predict == 0 or o.num_predict < -2:
            raise InvalidRequestError(f"num_predict must be positive, -1 or -2, got {o.num_predict}", param="num_predict")
        if o.num_ctx is not None and not 0 < o.num_ctx <= context_length:
            raise InvalidRequestError(
                f"num_ctx must be in [1, {context_length}] (the served context length), got {o.num_ctx}",
                param="num_ctx")
        return SamplingParams(
            max_tokens=o.num_predict if o.num_predict > 0 else None, temperature=o.temperature, top_p=o.top_p,
            top_k=o.top_k, min_p=o.min_p, stop=list(o.stop or []),
            seed=o.seed if o.seed is None or o.seed >= 0 else None,  # Ollama's default -1: a fresh seed
            repetition_penalty=o.repeat_penalty, presence_penalty=o.presence_penalty,
            frequency_penalty=o.frequency_penalty)


class OllamaGenerateRequest(_OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None
    suffix: str | None = None


class OllamaChatRequest(_OllamaRequest):
    messages: list[OllamaMessage] = []
    tools: list[dict[str, Any]] | None = None


def _created_at() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _timings(gen: Generation, out: RequestOutput) -> dict[str, Any]:
    ns = 1_000_000_000
    first = gen.first_token_at or gen.finished_at or gen.arrival
    end = gen.finished_at or first
    return {"total_duration": int((end - gen.arrival) * ns), "load_duration": 0,
            "prompt_eval_count": len(out.prompt_token_ids), "prompt_eval_duration": int((first - gen.arrival) * ns),
            "eval_count": len(out.outputs[0].token_ids), "eval_duration": int((end - first) * ns)}


def _json(obj: dict[str, Any]) -> Response:
    """A whole (non-streamed) reply: one JSON line, newline included, as Ollama sends it."""
    return Response(ndjson_line(obj), media_type="application/json")


def _reply_line(model: str, part: dict[str, Any], done: bool, **rest: Any) -> dict[str, Any]:
    """One line of a reply: `part` is its payload ({"response": text} or {"message": {...}})."""
    return {"model": model, "created_at": _created_at(), **part, "done": done, **rest}


def _loaded(model: str, piece: Any) -> Response:
    """Ollama's "load the model" call (no prompt): the model is always loaded here."""
    return _json(_reply_line(model, piece(""), True, done_reason="load"))


def _text_only(has_images: bool) -> None:
    if has_images:
        raise InvalidRequestError("images are not supported: the served model reads text only", param="images")


async def _serve(request: Request, state: ServerState, body: _OllamaRequest, ids: list[int],
                 params: SamplingParams, piece: Any, extra_final: Any, plan: chat_pipeline.ChatPlan | None = None) -> Response:
    gen = Generation(state, ids, params)
    model = body.model

    def final(out: RequestOutput, text: str, calls: list[Any] | None = None) -> dict[str, Any]:
        part = piece(text)
        if calls:
            part["message"]["tool_calls"] = [c.ollama() for c in calls]
        return _reply_line(model, part, True, done_reason=out.outputs[0].finish_reason or "stop",
                           **_timings(gen, out), **extra_final(out))

    async def lines() -> AsyncIterator[str]:
        split = chat_pipeline.ToolStream(plan or chat_pipeline.ChatPlan([], chat_pipeline.NO_TOOLS, "hermes"))
        try:
            async for out in gen.outputs():
                delta, calls = split.update(out.outputs[0].text, out.finished)
                if out.finished:
                    if delta:
                        yield ndjson_line(_reply_line(model, piece(delta), False))
                    yield ndjson_line(final(out, "", split.calls))
                elif delta or calls:
                    line = _reply_line(model, piece(delta), False)
                    if calls:
                        line["message"]["tool_calls"] = [c.ollama() for c in calls]
                    yield ndjson_line(line)
        except APIError as e:
            yield ndjson_line({"error": e.message})

    def render(out: RequestOutput) -> Response:
        text = out.outputs[0].text
        text, calls = chat_pipeline.final_message(plan, text) if plan is not None else (text, [])
        return _json(final(out, text or "", calls))

    return await answer(request, gen, body.stream, lines, render, NDJSON)


@router.post("/api/generate")
async def generate(body: OllamaGenerateRequest, request: Request) -> Response:
    state = checked_state(request, body.model, ollama=True)
    _text_only(bool(body.images))
    if body.suffix:
        raise InvalidRequestError("suffix (fill-in-the-middle) is not supported: the chat template has no "
                                  "fill-in-the-middle form", param="suffix")
    params = body.sampling_params(state.backend.max_model_len)
    structured.attach(params, structured.ollama_spec(body.format), state.backend)
    if not body.prompt and not body.system:
        return _loaded(body.model, _response)
    if body.raw:
        ids = await state.encode(body.prompt, add_special_tokens=True)
    else:
        msgs = ([ChatMessage(role="system", content=body.system)] if body.system else []) + [
            ChatMessage(role="user", content=body.prompt)]
        ids = await state.encode(state.render_chat(msgs, True), add_special_tokens=False)
    return await _serve(request, state, body, ids, params, _response,
                        lambda out: {"context": list(out.prompt_token_ids) + list(out.outputs[0].token_ids)})


@router.post("/api/chat")
async def chat(body: OllamaChatRequest, request: Request) -> Response:
    state = checked_state(request, body.model, ollama=True)
    _text_only(any(m.images for m in body.messages))
    params = body.sampling_params(state.backend.max_model_len)
    if not body.messages:
        return _loaded(body.model, _assistant)
    tools = parse_tools(body.tools, None, None)
    # Off the event loop: a long conversation takes seconds to render and tokenize, /health shares the loop.
    plan = await asyncio.to_thread(chat_pipeline.prepare_chat, state.backend, [_message_dict(m) for m in body.messages],
                                   tools, params, structured.ollama_spec(body.format))
    return await _serve(request, state, body, plan.prompt_ids, params, _assistant, lambda out: {}, plan)


def _response(text: str) -> dict[str, Any]:  # /api/generate's payload
    return {"response": text}


def _assistant(text: str) -> dict[str, Any]:  # /api/chat's payload
    return {"message": {"role": "assistant", "content": text}}


def _message_dict(m: OllamaMessage) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:  # Ollama sends arguments as an object; the pipeline speaks OpenAI's JSON text
        d["tool_calls"] = [{"type": "function", "function": {
            "name": (c.get("function") or {}).get("name", ""),
            "arguments": json.dumps((c.get("function") or {}).get("arguments") or {})}} for c in m.tool_calls]
    if m.tool_name:
        d["name"] = m.tool_name
    return d


def _model_entry(state: ServerState) -> dict[str, Any]:
    path = state.config.model
    name = state.model_name if ":" in state.model_name else f"{state.model_name}:latest"
    try:
        st = os.stat(path)
        size, mtime = (st.st_size if os.path.isfile(path) else _dir_size(path)), st.st_mtime
    except OSError:
        size, mtime = 0, 0.0
    digest = hashlib.sha256(f"{os.path.abspath(path)}:{size}:{mtime}".encode()).hexdigest()
    return {"name": name, "model": name, "size": size, "digest": digest,
            "modified_at": dt.datetime.fromtimestamp(mtime, dt.timezone.utc).isoformat().replace("+00:00", "Z"),
            "details": {"parent_model": "", "format": "gguf" if path.endswith(".gguf") else "safetensors",
                        "family": "", "families": None, "parameter_size": "", "quantization_level": ""}}


def _dir_size(path: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    return {"models": [_model_entry(get_state(request))]}


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    state = get_state(request)
    entry = _model_entry(state)
    entry.pop("modified_at")
    return {"models": [{**entry, "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                        "context_length": state.backend.max_model_len}]}


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION}


class OllamaShowRequest(_Strict):
    model: str | None = None
    name: str | None = None  # older clients send `name`
    verbose: bool = False


@router.post("/api/show")
async def show(body: OllamaShowRequest, request: Request) -> Response:
    """What Ollama clients probe before listing a model: details, capabilities, template, parameters."""
    state = checked_state(request, body.model or body.name, ollama=True)
    entry = _model_entry(state)
    template = state.backend.chat_template_source() or ""
    caps = ["completion", "tools", "embedding"]  # every Backend embeds
    ctx = state.backend.max_model_len
    return _json({
        "modelfile": f"FROM {entry['name']}\n", "template": template, "parameters": f"num_ctx {ctx}",
        "details": entry["details"], "capabilities": caps, "modified_at": entry["modified_at"],
        "model_info": {"general.architecture": entry["details"]["family"] or "llama",
                       "general.context_length": ctx, "gearshift.engine": state.backend.name},
    })


class OllamaEmbedRequest(_Strict):
    model: str
    input: str | list[str] = ""
    truncate: bool = True  # Ollama's default: cut an input to the context instead of failing
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    dimensions: int | None = None


class OllamaEmbeddingsRequest(_Strict):  # the legacy /api/embeddings
    model: str
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


async def _embed(state: ServerState, texts: list[str], truncate: bool) -> tuple[Any, int]:
    limit = state.backend.max_model_len
    ids = [state.backend.encode(t, add_special_tokens=True) for t in texts]
    if truncate:
        ids = [i[:limit] for i in ids]
    inputs = embedding.token_inputs(state.backend, ids)
    return await state.embed(inputs), sum(map(len, inputs))


@router.post("/api/embed")
async def embed(body: OllamaEmbedRequest, request: Request) -> Response:
    state = checked_state(request, body.model, ollama=True)
    embedding.check_dimensions(body.dimensions)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or any(t == "" for t in texts):
        raise InvalidRequestError("input must be a non-empty string or list of strings", param="input")
    start = time.monotonic()
    vectors, n = await _embed(state, texts, body.truncate)
    return _json({"model": body.model, "embeddings": [[float(x) for x in v] for v in vectors],
                  "total_duration": int((time.monotonic() - start) * 1e9), "load_duration": 0,
                  "prompt_eval_count": n})


@router.post("/api/embeddings")
async def embeddings_legacy(body: OllamaEmbeddingsRequest, request: Request) -> Response:
    state = checked_state(request, body.model, ollama=True)
    if not body.prompt:
        return _json({"embedding": []})  # Ollama's answer, too
    vectors, _ = await _embed(state, [body.prompt], truncate=True)
    return _json({"embedding": [float(x) for x in vectors[0]]})
