"""The contract between the HTTP layer and an engine. Both engines implement it, so clients, metrics and
the operator cannot tell them apart except by speed and footprint.

Everything the server (engine/server/) reads from a backend is declared here: the server never probes a
backend with getattr/hasattr. A new capability is a member here plus its implementation in both backends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Literal, Protocol

from gearshift.engine.outputs import EngineStats, RequestOutput
from gearshift.engine.sampling_params import SamplingParams


class Backend(Protocol):
    name: Literal["paged", "gguf"]
    model_name: str  # the served model name
    max_model_len: int  # context length in tokens (prompt + output)
    vocab_size: int | None  # token ids at or above it are rejected; None until start() has loaded the model
    broken: str | None  # why the engine can no longer serve (worker died, steps keep failing); None: it can

    async def start(self) -> None:
        """Load the model and start the worker. Raises ModelLoadError with a clear message."""

    async def stop(self) -> None:
        """Stop the worker; every unfinished request ends with finish_reason 'abort'."""

    def ready(self) -> bool:
        """Model loaded and the worker stepping (GET /ready)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's own template (from tokenizer_config or GGUF metadata)."""

    def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs until finished.

        Validation happens before anything is queued: InvalidRequestError (prompt too long, bad values)
        or EngineOverloadedError (queue full) is raised on the first `__anext__`. Closing the iterator
        early (client gone, timeout) aborts the request and frees its resources at the next step.
        """

    def stats(self) -> EngineStats: ...

    def chat_template_source(self) -> str | None:
        """The chat template's source text (None: the model has none): tool-aware rendering, /api/show."""

    async def embed(self, inputs: list[list[int]]) -> Any:
        """Pooled, L2-normalised vectors float32 [len(inputs), hidden] of token id lists (embeddings
        endpoints). ModelNotReadyError before start() has loaded the model."""

    def grammar_vocab(self) -> Any:
        """The vocabulary as the structured-output grammar engine sees it (pipeline/guided.py), built once."""


async def latest_outputs(
    queue: asyncio.Queue[RequestOutput | BaseException],
) -> AsyncIterator[RequestOutput]:
    """Read a worker thread's outputs for one request until it finishes.

    Outputs are cumulative, so a consumer that fell behind only needs the newest one: stale ones are
    skipped. An exception the worker put on the queue is raised here (the engine ended the request).
    """
    while True:
        item = await queue.get()
        while not queue.empty() and not isinstance(item, BaseException):
            item = queue.get_nowait()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finished:
            return


async def relay_outputs(
    queue: asyncio.Queue[RequestOutput | BaseException], on_end: Callable[[bool], None],
) -> AsyncIterator[RequestOutput]:
    """A backend's `generate` body after admission: yield the worker's outputs for one request, then call
    `on_end(finished)`. finished is False when the consumer left early (closed, cancelled, timed out): the
    backend must then abort the request. An exception from the engine counts as finished (nothing left
    to abort)."""
    finished = False
    try:
        async with aclosing(latest_outputs(queue)) as outputs:
            async for item in outputs:
                finished = item.finished
                yield item
    except Exception:
        finished = True
        raise
    finally:
        on_end(finished)
