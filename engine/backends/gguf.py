"""The light engine: a GGUF model on llama.cpp (llama-cpp-python) behind the same Backend contract.

One llama.cpp context, one worker thread, one request at a time from a bounded FIFO queue. That is the
right shape for one or a few users on a CPU node; the queue depth is exported as `num_waiting` so the
operator and autoscalers see when this engine is outgrown and the paged engine should take over.

Threads: the worker owns the llama.cpp context. The event loop only tokenizes (read-only vocab, safe
alongside decoding) and moves requests in and out of the queue under a lock. ctypes releases the GIL during
llama.cpp calls, so the HTTP layer keeps running while a token is computed.

Around it: a queued request (gguf_request.py), one choice's decoding (gguf_decode.py), loading
(gguf_loader.py), the model's vocabulary and context (gguf_vocab.py), chat templates (gguf_chat.py),
embeddings (gguf_embed.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Literal

from gearshift.engine.backends.base import relay_outputs
from gearshift.engine.backends.gguf_chat import GGUFChatTemplate
from gearshift.engine.backends.gguf_decode import ChoiceDecoder
from gearshift.engine.backends.gguf_loader import load_llama
from gearshift.engine.backends.gguf_request import GGUFRequest
from gearshift.engine.backends.gguf_vocab import (
    build_grammar_vocab,
    context_limit,
    control_strings,
    token_text,
)
from gearshift.engine.config import EngineConfig
from gearshift.engine.control_tokens import ControlShield
from gearshift.engine.errors import (
    EngineError,
    EngineOverloadedError,
    InvalidRequestError,
    ModelNotReadyError,
)
from gearshift.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from gearshift.engine.pipeline.detokenizer import OutputProcessor, text_outputs
from gearshift.engine.pipeline.request_checks import check_token_ids, context_budget
from gearshift.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import llama_cpp

log = logging.getLogger("gearshift.gguf")
# Requests that fail in a row before the engine counts as broken (/health 503, the kubelet restarts it).
MAX_FAILED_REQUESTS = 3


class GGUFBackend:
    name: Literal["paged", "gguf"] = "gguf"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_name: str = config.served_model_name or "model"
        self.max_model_len: int = config.max_model_len or 0  # the real value is known after start()
        self.vocab_size: int | None = None
        self._llm: llama_cpp.Llama | None = None
        self._chat: GGUFChatTemplate | None = None
        self._cv = threading.Condition()
        self._waiting: collections.deque[GGUFRequest] = collections.deque()
        self._current: GGUFRequest | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._shield = ControlShield([])  # the vocabulary's control tokens, once loaded
        self._failed_in_a_row = 0  # worker thread only
        self.broken: str | None = None  # why the engine cannot serve any more (/health answers 503)
        self._grammar_vocab: Any = None
        self._embedder: Any = None
        # Streams still open (event loop only): their queued tokens are detokenized with the model, so
        # stop() leaves the model to the last of them to close it.
        self._open_streams = 0

    # ----- lifecycle -----

    async def start(self) -> None:
        llm = await asyncio.to_thread(load_llama, self.config)
        self._llm = llm
        self.max_model_len = context_limit(llm)
        self.vocab_size = llm.n_vocab()
        self._chat = GGUFChatTemplate(
            llm.metadata.get("tokenizer.chat_template"),
            bos_token=token_text(llm, llm.token_bos()),
            eos_token=token_text(llm, llm.token_eos()),
        )
        self._shield = ControlShield(control_strings(llm))
        self._stopping = False
        self._thread = threading.Thread(target=self._worker, name="gguf-worker", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._cv:
            self._stopping = True
            pending = list(self._waiting)
            self._waiting.clear()
            if self._current is not None:
                self._current.cancelled = True
            self._cv.notify_all()
        for req in pending:
            req.cancelled = True
            req.post(req.final_abort())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self._open_streams == 0:
            self._release_model()

    def _release_model(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def ready(self) -> bool:
        return (self._llm is not None and self._thread is not None and self._thread.is_alive()
                and not self._stopping and self.broken is None)

    # ----- tokens and templates -----

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # special=True: control tokens written in the text (e.g. <|im_start|> from a chat template) are
        # parsed as such, as llama_cpp.Llama.create_completion does with a string prompt; those a chat
        # message wrote stay text (the shield marked them when the template rendered).
        llm = self._model()
        return self._shield.encode(
            text, add_special_tokens,
            lambda t, bos: llm.tokenize(t.encode("utf-8"), add_bos=bos, special=True),
            lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False, special=False))

    def decode(self, token_ids: list[int]) -> str:
        llm = self._model()
        check_token_ids(list(token_ids), llm.n_vocab(), "tokens")
        return llm.detokenize(list(token_ids)).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        self._model()
        assert self._chat is not None
        return self._chat.render(self._shield.shield(messages), add_generation_prompt=add_generation_prompt,
                                 **extra)

    def chat_template_source(self) -> str | None:
        self._model()
        return self._chat.source if self._chat is not None else None

    async def embed(self, inputs: list[list[int]]) -> Any:
        """Pooled, normalised vectors float32 [len(inputs), hidden] from a second, embedding-only context on
        the same weights (gguf_embed.py), so generation's context and cache are untouched."""
        self._model()
        if self._embedder is None:
            from gearshift.engine.backends.gguf_embed import GGUFEmbedder
            from gearshift.engine.config import usable_cpus

            self._embedder = GGUFEmbedder(self.config, self.max_model_len, self.config.threads or usable_cpus())
        return await asyncio.to_thread(self._embedder.embed, inputs)

    def grammar_vocab(self) -> Any:
        """The grammar engine's view of llama.cpp's vocabulary, built on first use (~0.3 s) and kept."""
        if self._grammar_vocab is None:
            self._grammar_vocab = build_grammar_vocab(self._model())
        return self._grammar_vocab

    # ----- requests -----

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        prompt_ids = self._prompt_ids(prompt)
        max_tokens = self._max_tokens(len(prompt_ids), params)
        req = GGUFRequest(request_id, prompt_ids, params, max_tokens, asyncio.get_running_loop(), asyncio.Queue())
        with self._cv:
            if self._stopping or self._thread is None or not self._thread.is_alive() or self.broken:
                raise ModelNotReadyError(self.broken or "the gguf engine is not running")
            if len(self._waiting) >= self.config.max_waiting:
                raise EngineOverloadedError(
                    f"{len(self._waiting)} requests are already waiting (max_waiting={self.config.max_waiting})"
                )
            self._waiting.append(req)
            self._cv.notify()

        def on_end(finished: bool) -> None:
            if not finished:  # consumer gone (closed, cancelled, timed out): stop at the next token
                req.cancelled = True
                with self._cv:
                    if req in self._waiting:
                        self._waiting.remove(req)

        # Text, stop strings and hold-back: the request pipeline, here on the event loop (as for the paged
        # engine); the worker hands out token ids only.
        texts = text_outputs(relay_outputs(req.queue, on_end), OutputProcessor(self._detokenize, prompt_ids, params),
                             req.stopped.add)
        self._open_streams += 1
        try:
            async with aclosing(texts) as outputs:
                async for item in outputs:
                    yield item
        finally:
            self._open_streams -= 1
            if self._stopping and self._open_streams == 0 and self._thread is None:
                self._release_model()  # stop() ran while this stream still had tokens to detokenize

    def _detokenize(self, ids: list[int]) -> str:
        # special=False: control tokens have no text, as the paged engine's skip_special_tokens
        return self._model().detokenize(ids).decode("utf-8", errors="replace")

    def stats(self) -> EngineStats:
        cur = self._current
        llm = self._llm
        n_ctx = self.max_model_len if llm is not None else 0
        used = min(llm.n_tokens, n_ctx) if (llm is not None and cur is not None) else 0
        block = self.config.block_size
        total_blocks = n_ctx // block
        used_blocks = min(total_blocks, -(-used // block))
        return EngineStats(
            num_running=1 if cur is not None else 0,
            num_waiting=len(self._waiting),
            kv_cache_usage=used / n_ctx if n_ctx else 0.0,
            num_total_blocks=total_blocks,
            num_free_blocks=total_blocks - used_blocks,
            num_preemptions=0,
            prefix_cache_queries=self._prefix_queries,
            prefix_cache_hits=self._prefix_hits,
        )

    # ----- validation (event loop, before queuing) -----

    def _model(self) -> llama_cpp.Llama:
        if self._llm is None:
            raise ModelNotReadyError("the model is not ready yet")
        return self._llm

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        llm = self._model()
        if isinstance(prompt, str):
            ids = self.encode(prompt, add_special_tokens=True)
        else:
            check_token_ids(prompt, llm.n_vocab(), "prompt")
            ids = list(prompt)
        if not ids:
            bos = llm.token_bos()
            if bos < 0:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            ids = [bos]
        return ids

    def _max_tokens(self, n_prompt: int, params: SamplingParams) -> int:
        return context_budget(n_prompt, params.max_tokens, self.max_model_len)

    # ----- the worker thread -----

    def _worker(self) -> None:
        try:
            self._serve_queue()
        except BaseException as e:  # the worker died: every waiting request hears it, /health turns 503
            log.exception("the gguf worker thread died")
            self.broken = f"the engine's worker thread died: {type(e).__name__}: {e}"
            with self._cv:
                pending = ([self._current] if self._current is not None else []) + list(self._waiting)
                self._waiting.clear()
                self._current = None
            for req in pending:
                req.post(EngineError(f"the engine stopped: {type(e).__name__}"))

    def _serve_queue(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                req = self._waiting.popleft()
                self._current = req
            final: RequestOutput | BaseException | None = None
            try:
                if not req.cancelled:
                    final = self._serve(req)
                    self._failed_in_a_row = 0
            except Exception as e:  # a llama.cpp failure ends this request with an error, not the worker
                log.exception("gguf request %s failed", req.request_id)
                final = EngineError(f"generation failed: {type(e).__name__}: {e}")
                # Only a context that cannot evaluate one token from scratch counts against the engine: a
                # failure this request's input caused must not take the pod down for everyone.
                self._failed_in_a_row = 0 if self._context_works() else self._failed_in_a_row + 1
                if self._failed_in_a_row >= MAX_FAILED_REQUESTS:
                    self.broken = f"{self._failed_in_a_row} requests in a row failed, the last with {e!r}"
            except BaseException as e:  # the worker dies (see _worker); this request hears it first
                final = EngineError(f"the engine stopped: {type(e).__name__}")
                raise
            finally:
                # Not running any more before the consumer hears it is done: stats never show a
                # finished request as running.
                with self._cv:
                    self._current = None
                if final is not None:
                    req.post(final)

    def _context_works(self) -> bool:
        """After a failed request: clear the context and evaluate one token. False if that fails too."""
        try:
            llm = self._model()
            llm.reset()
            llm.eval([max(llm.token_bos(), 0)])
            llm.reset()
            return True
        except Exception:
            log.exception("the llama.cpp context fails on a one-token prompt")
            return False

    def _serve(self, req: GGUFRequest) -> RequestOutput:
        llm = self._model()
        req.first_scheduled_time = time.time()
        if not self.config.enable_prefix_caching:
            llm.reset()
        n = req.params.n
        outputs = [CompletionOutput(index=i) for i in range(n)]

        def emit(out: CompletionOutput) -> None:
            if req.first_token_time is None:
                req.first_token_time = time.time()
            outputs[out.index] = out
            req.post(req.output(list(outputs), finished=False))

        for i in range(n):
            hit = self._count_prefix_hit(llm, req.prompt_ids)
            if i == 0:
                req.num_cached_tokens = hit
            decoder = ChoiceDecoder(llm, req.prompt_ids, req.params, i, req.max_tokens)
            outputs[i] = decoder.run(lambda: req.cancelled or self._stopping, emit, lambda i=i: i in req.stopped)
            if outputs[i].finish_reason == "abort":
                for j in range(i + 1, n):
                    outputs[j] = CompletionOutput(index=j, finish_reason="abort")
                break
        return req.output(outputs, finished=True)

    def _count_prefix_hit(self, llm: llama_cpp.Llama, prompt_ids: list[int]) -> int:
        # Llama.generate reuses the KV cache of the longest common prefix with what it evaluated last.
        hit = 0
        for a, b in zip(llm._input_ids.tolist(), prompt_ids, strict=False):
            if a != b:
                break
            hit += 1
        self._prefix_queries += len(prompt_ids)
        hit = min(hit, len(prompt_ids) - 1)
        self._prefix_hits += hit
        return hit
