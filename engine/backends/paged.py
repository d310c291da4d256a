"""The paged engine behind the Backend contract: `LLMEngine` stepped by one background worker thread.

Threads: the worker owns the engine (add_request / step / abort all happen there, between steps) and only
turns token ids into token ids. The event loop validates and admits requests, then hands adds and aborts
over through a thread-safe inbox; each request has its own asyncio queue that the worker feeds with
`call_soon_threadsafe`, and the request pipeline's output processor (pipeline/detokenizer.py) turns those
token outputs into text there, off the step thread; a stop string it finds finishes that choice in the
engine through the inbox. With nothing
to do the worker sleeps on an Event, so idle connections cost nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from gearshift.engine.backends.base import relay_outputs
from gearshift.engine.config import EngineConfig
from gearshift.engine.errors import (
    EngineError,
    EngineOverloadedError,
    GearshiftError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotReadyError,
)
from gearshift.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from gearshift.engine.pipeline.detokenizer import OutputProcessor, text_outputs
from gearshift.engine.pipeline.request_checks import check_token_ids, context_budget
from gearshift.engine.sampling_params import SamplingParams

log = logging.getLogger("gearshift.paged")
# Steps that fail in a row before the engine counts as broken (/health 503, the kubelet restarts the pod):
# a step that a request's own data breaks fails only that request and does not count (llm_engine).
MAX_FAILED_STEPS = 3


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput snapshots, or an exception that ends the stream
    n: int
    prompt_ids: list[int]

    def post(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class PagedBackend:
    name: Literal["paged", "gguf"] = "paged"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_name: str = config.served_model_name or "model"
        self.max_model_len: int = config.max_model_len or 0  # the real value is known after start()
        self.vocab_size: int | None = None
        self._engine: Any = None
        self._tokenizer: Any = None
        self._inbox: queue.SimpleQueue[tuple[str, str, Any, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = EngineStats()
        self._live = 0  # admitted and unfinished; touched only on the event loop
        self._grammar_vocab: Any = None
        self._failed_steps = 0  # consecutive steps that raised (worker thread only)
        self.broken: str | None = None  # why the engine cannot serve any more (/health answers 503)

    # ----- lifecycle -----

    async def start(self) -> None:
        try:
            from gearshift.engine.llm_engine import LLMEngine
        except ImportError as e:
            raise ModelLoadError(f"the paged engine is not available in this build: {e}") from None
        # The engine is built on the thread that will step it. libgomp gives every thread that runs a
        # parallel region its own team, and once it manages more threads than there are CPUs it cuts its
        # spin-wait to ~100 iterations: a model warmed up on an executor thread and stepped on another
        # decoded at ~70 instead of ~47 ms a token (SmolLM2, batch 1, 2 CPUs).
        built: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, args=(LLMEngine, built), name="paged-engine", daemon=True)
        self._thread.start()
        try:
            self._engine = await asyncio.wrap_future(built)
        except BaseException:
            self._stopping = True
            self._wake.set()
            raise
        self._tokenizer = self._engine.tokenizer
        self.max_model_len = self._engine.max_model_len
        self.vocab_size = self._engine.vocab_size
        self._stats = self._engine.stats()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def ready(self) -> bool:
        return (self._engine is not None and self._thread is not None and self._thread.is_alive()
                and not self._stopping and self.broken is None)

    # ----- tokens and templates -----

    def _tok(self) -> Any:
        if self._tokenizer is None:
            raise ModelNotReadyError("the model is not ready yet")
        return self._tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok().encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int]) -> str:
        self._check_ids(token_ids, "tokens")
        return self._tok().decode(list(token_ids))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        return self._tok().apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)

    def chat_template_source(self) -> str | None:
        return self._tok().chat_template

    def stats(self) -> EngineStats:
        return self._stats

    async def embed(self, inputs: list[list[int]]) -> Any:
        """Pooled, normalised vectors float32 [len(inputs), hidden] (paged_embed.py), computed by the worker
        between two steps."""
        if not self.ready():
            raise ModelNotReadyError(self.broken or "the paged engine is not running")
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._inbox.put(("embed", "", inputs, done))
        self._wake.set()
        return await asyncio.wrap_future(done)

    def grammar_vocab(self) -> Any:
        """The grammar engine's view of the vocabulary, built on first use (~0.3 s) and kept."""
        if self._grammar_vocab is None:
            from gearshift.engine.pipeline.guided import vocab_from_hf_json

            tok = self._tok()
            self._grammar_vocab = vocab_from_hf_json(tok._tok.to_str(), tok.vocab_size, tok.eos_token_ids)
        return self._grammar_vocab

    # ----- requests -----

    def _check_ids(self, ids: list[int], param: str) -> None:
        check_token_ids(ids, self.vocab_size, param)

    def _validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_ids(ids, "prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        context_budget(len(ids), params.max_tokens, self.max_model_len)
        return ids

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        ids = self._validate(prompt, params)
        if not self.ready():
            raise ModelNotReadyError(self.broken or "the paged engine is not running")
        # Room for a full batch running plus `max_waiting` queued behind it.
        if self._live >= self.config.max_num_seqs + self.config.max_waiting:
            raise EngineOverloadedError(
                f"{self._live} requests in flight (max_num_seqs={self.config.max_num_seqs}, "
                f"max_waiting={self.config.max_waiting})")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n, ids)
        self._streams[request_id] = stream
        self._live += 1
        self._inbox.put(("add", request_id, ids, params))
        self._wake.set()

        def on_end(finished: bool) -> None:
            self._live -= 1
            if not finished:  # consumer gone (closed, cancelled, timed out): free its blocks next step
                self._inbox.put(("abort", request_id, None, None))
                self._wake.set()

        def finish_choice(index: int) -> None:  # a stop string ended it: stop computing it
            self._inbox.put(("finish", request_id, index, None))
            self._wake.set()

        texts = text_outputs(relay_outputs(stream.queue, on_end), OutputProcessor(self._detokenize, ids, params),
                             finish_choice)
        async with aclosing(texts) as outputs:
            async for item in outputs:
                yield item

    def _detokenize(self, ids: list[int]) -> str:
        return self._tok().decode(ids, True)

    # ----- the worker thread -----

    def _apply_inbox(self) -> None:
        while True:
            try:
                op, rid, ids, params = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "embed":  # ids: the inputs, params: a concurrent Future for the vectors
                try:
                    from gearshift.engine.backends.paged_embed import embed_on_engine

                    params.set_result(embed_on_engine(self._engine, ids))
                except Exception as e:
                    params.set_exception(e)
            elif op == "add":
                if rid not in self._streams:
                    continue
                try:
                    self._engine.add_request(rid, ids, params)
                except Exception as e:
                    stream = self._streams.pop(rid)
                    stream.post(e if isinstance(e, GearshiftError) else EngineError(f"cannot add request: {e}"))
            elif op == "finish":  # ids: the index of the choice a stop string ended
                if rid in self._streams:
                    self._engine.finish_choice(rid, ids)
            else:
                if self._streams.pop(rid, None) is not None:
                    self._engine.abort(rid)

    def _run(self, engine_cls: Any, built: concurrent.futures.Future[Any]) -> None:
        try:
            engine = engine_cls(self.config, detokenize=False)  # text is made on the event loop
        except BaseException as e:
            built.set_exception(e)
            return
        self._engine = engine
        built.set_result(engine)
        self._worker()

    def _worker(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # the worker died: every stream hears it, /health turns 503
            log.exception("the paged engine's worker thread died")
            self.broken = f"the engine's worker thread died: {type(e).__name__}: {e}"
            for stream in list(self._streams.values()):
                stream.post(EngineError(f"the engine stopped: {type(e).__name__}"))
            self._streams.clear()

    def _fail_all(self, engine: Any, why: str) -> None:
        for rid, stream in list(self._streams.items()):
            stream.post(EngineError(why))
            try:
                engine.abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
        self._streams.clear()

    def _report_failures(self, engine: Any) -> None:
        """Requests the last step ended with an error (engine.take_failures) get an error event each."""
        for rid, e in engine.take_failures().items():
            stream = self._streams.pop(rid, None)
            if stream is not None:
                log.error("request %s failed in a step: %s: %s", rid, type(e).__name__, e)
                stream.post(EngineError(f"generation failed: {type(e).__name__}: {e}"))

    def _loop(self) -> None:
        engine = self._engine
        while not self._stopping:
            self._apply_inbox()
            if not engine.has_unfinished():
                self._stats = engine.stats()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # only the requests of that step fail; the rest go on
                log.exception("engine step failed")
                self._report_failures(engine)
                self._failed_steps += 1
                if self._failed_steps >= MAX_FAILED_STEPS:
                    self.broken = f"{self._failed_steps} engine steps in a row failed, the last with {e!r}"
                    self._fail_all(engine, self.broken)
                    return
                continue
            self._failed_steps = 0
            self._report_failures(engine)
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                stream.post(out)  # the engine builds fresh output objects every step
                if out.finished:
                    self._streams.pop(out.request_id, None)
            stats = engine.stats()
            # Requests still in the inbox wait too, from the client's point of view.
            self._stats = dataclasses.replace(stats, num_waiting=stats.num_waiting + self._inbox.qsize())
        # Stopping: every unfinished request ends with finish_reason 'abort'.
        for rid, stream in list(self._streams.items()):
            try:
                engine.abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
            stream.post(RequestOutput(request_id=rid, prompt_token_ids=stream.prompt_ids, finished=True,
                                      outputs=[CompletionOutput(index=i, finish_reason="abort") for i in range(stream.n)]))
        self._streams.clear()
        self._stats = engine.stats()
