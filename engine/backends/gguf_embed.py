"""Embeddings on the gguf engine: a second llama.cpp context on the same (mmapped, so shared) weights, made
for embeddings (last-token pooling), so embedding never touches the generation context or its cache.

Pooling: the final-normed hidden state of the last token (llama.cpp's LAST pooling), L2-normalised; the
paged engine pools the same row, so both engines embed alike.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from gearshift.engine.config import EngineConfig


class GGUFEmbedder:
    def __init__(self, config: EngineConfig, n_ctx: int, threads: int) -> None:
        self.config = config
        self.n_ctx = n_ctx
        self.threads = threads
        self._llm: Any = None
        self._lock = threading.Lock()  # one embedding batch at a time on this context

    def _model(self) -> Any:
        if self._llm is None:
            import llama_cpp

            self._llm = llama_cpp.Llama(
                model_path=self.config.model, n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx,
                n_threads=self.threads, n_threads_batch=self.threads, use_mmap=True, embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST, verbose=False)
        return self._llm

    def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """Token id lists -> float32 [len(inputs), hidden], each row L2-normalised. Blocking: run it off
        the event loop."""
        import llama_cpp

        with self._lock:
            llm = self._model()
            out = np.empty((len(inputs), llm.n_embd()), dtype=np.float32)
            for i, ids in enumerate(inputs):
                llm._batch.reset()
                llm._ctx.kv_cache_clear()
                llm._batch.add_sequence(ids, 0, True)
                llm._ctx.decode(llm._batch)
                ptr = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)
                out[i] = np.ctypeslib.as_array(ptr, shape=(llm.n_embd(),))
            llm._batch.reset()
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
