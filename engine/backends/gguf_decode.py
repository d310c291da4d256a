"""One choice of one request decoded on a llama.cpp context: sampling, token stop conditions, logprobs.

Runs on the GGUF worker thread only (a llama.cpp context is single-threaded). Sampling is llama-cpp-python's
own `Llama.generate`, the very path `Llama.create_completion` takes, so greedy text equals calling
`llama_cpp.Llama` directly. Semantics follow the OpenAI/vLLM API rather than llama-cpp-python's:
  * the EOS (or a stop_token_ids token) ends the choice with 'stop' and is counted in token_ids/usage;
  * text, stop strings and their hold-back are the request pipeline's (pipeline/detokenizer.py, on the
    event loop, the same code as the paged engine's): it calls `stopped` true when a stop string ended
    this choice, and the decoder ends it at the next token;
  * logprobs are of the model's raw distribution at each sampled position (before penalties).
"""

from __future__ import annotations

import ctypes
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from gearshift.engine.outputs import CompletionOutput, Logprob
from gearshift.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import llama_cpp


def choice_seed(params: SamplingParams, index: int) -> int:
    """Seeded requests are reproducible per choice; unseeded ones draw a fresh seed."""
    if params.seed is not None:
        return (params.seed + index) & 0xFFFFFFFF
    return random.getrandbits(32)


class ChoiceDecoder:
    """Decodes choice `index` of a request; `emit` gets a fresh snapshot after every token."""

    def __init__(self, llm: llama_cpp.Llama, prompt_ids: list[int], params: SamplingParams, index: int,
                 max_tokens: int) -> None:
        self.llm = llm
        self.prompt_ids = prompt_ids
        self.params = params
        self.index = index
        self.max_tokens = max_tokens
        self.token_ids: list[int] = []
        self.logprobs: list[Logprob] | None = [] if params.logprobs is not None else None
        self._vocab = llm._model.vocab
        self._n_vocab = llm.n_vocab()
        self.guide = params.guide.fork() if params.guide is not None else None
        self._mask = np.zeros((1, (self._n_vocab + 31) // 32), dtype=np.int32)  # [1, W] grammar bitmask

    def run(self, cancelled: Callable[[], bool], emit: Callable[[CompletionOutput], None],
            stopped: Callable[[], bool] = lambda: False) -> CompletionOutput:
        """Decode until a token ends the choice; `cancelled` aborts it (and the request), `stopped` ends
        just this choice (a stop string: the text side already finished it)."""
        import llama_cpp

        p = self.params
        greedy = p.greedy
        self.llm.set_seed(choice_seed(p, self.index))
        gen = self.llm.generate(
            self.prompt_ids,
            top_k=p.top_k if p.top_k > 0 else 0,  # llama.cpp: k <= 0 is off
            top_p=p.top_p,
            min_p=p.min_p,
            typical_p=1.0,
            temp=0.0 if greedy else p.temperature,
            repeat_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            logits_processor=self._processors() or None,
        )
        out: CompletionOutput | None = None
        handoff = _DecodeHandoff(self.llm, emit)
        try:
            for token in gen:
                if cancelled():
                    out = self._snapshot("abort", None)
                    break
                if stopped():
                    out = self._snapshot("stop", None)
                    break
                self.token_ids.append(int(token))
                if self.guide is not None:
                    self.guide.accept(int(token))
                if self.logprobs is not None:
                    self.logprobs.append(self._logprob(int(token)))
                out = self._advance(int(token), llama_cpp.llama_vocab_is_eog(self._vocab, token))
                handoff.emit(out)
                if out.finished:
                    break
        finally:
            handoff.close()
            gen.close()
        if out is None:  # cancelled before the first token
            out = self._snapshot("abort", None)
        elif not out.finished:  # cancelled mid-way, or the context ran out under the sampler
            out = self._snapshot("abort" if cancelled() else "length", None)
        return out

    def _processors(self) -> list[Callable[[np.ndarray, np.ndarray], np.ndarray]]:
        procs = [self._mask_logits] if self.guide is not None else []
        if self.params.logit_bias:
            ids = np.array([t for t in self.params.logit_bias if t < self._n_vocab], dtype=np.int64)
            vals = np.array([self.params.logit_bias[t] for t in ids.tolist()], dtype=np.float32)

            def bias(_input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
                scores[ids] += vals
                return scores

            procs.insert(0, bias)
        return procs

    def _mask_logits(self, _input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """llama.cpp's first sampler stage (candidates still in token-id order): forbid what the grammar
        forbids. scores: float32 [n_vocab]."""
        assert self.guide is not None
        self.guide.fill(self._mask[0])
        allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: scores.shape[0]]  # [n_vocab]
        scores[allowed == 0] = -np.inf
        return scores

    def _advance(self, token: int, is_eog: bool) -> CompletionOutput:
        p = self.params
        if is_eog and not p.ignore_eos:
            return self._snapshot("stop", None)
        if token in p.stop_token_ids:
            return self._snapshot("stop", token)
        if len(self.token_ids) >= self.max_tokens:
            return self._snapshot("length", None)
        return self._snapshot(None, None)

    def _snapshot(self, finish: str | None, stop_reason: str | int | None) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            token_ids=list(self.token_ids),
            finish_reason=finish,  # type: ignore[arg-type]
            stop_reason=stop_reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
        )

    def _logprob(self, token: int) -> Logprob:
        # The context still holds the logits that produced `token` (last row of the last decode).
        ptr = self.llm._ctx.get_logits_ith(-1)
        logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self._n_vocab,))
        x = logits.astype(np.float64)  # [n_vocab]
        m = x.max()
        logz = m + np.log(np.exp(x - m).sum())
        k = self.params.logprobs or 0
        top: dict[int, float] = {}
        if k > 0:
            idx = np.argpartition(-x, k - 1)[:k]
            idx = idx[np.argsort(-x[idx])]
            top = {int(i): float(x[i] - logz) for i in idx}
        return Logprob(token_id=token, logprob=float(x[token] - logz), top=top)


class _DecodeHandoff:
    """Hands each token's output to `emit` as the context enters its next llama_decode, not as the token
    is sampled (a finished output goes at once).

    `emit` wakes the event loop, which then wants the GIL for its per-token work (detokenize, one SSE
    chunk). Woken at sampling time, it took the GIL at the worker's next short ctypes call (Llama.eval's
    kv_cache_seq_rm) and the worker waited out that whole per-token work before it could decode again;
    woken right before llama_decode, which releases the GIL for the whole forward pass, that work runs
    alongside the forward pass. Done by shadowing `decode` on this Llama's context object (the method
    `Llama.eval` calls) for the length of one choice; without that attribute every output goes at once."""

    def __init__(self, llm: llama_cpp.Llama, emit: Callable[[CompletionOutput], None]) -> None:
        self._emit = emit
        self._pending: CompletionOutput | None = None
        self._ctx = getattr(llm, "_ctx", None)
        self._hooked = self._ctx is not None and callable(getattr(self._ctx, "decode", None))
        if self._hooked:
            decode = self._ctx.decode  # the bound method of the class

            def decode_after_flush(batch: object) -> object:
                self.flush()
                return decode(batch)

            self._ctx.decode = decode_after_flush

    def emit(self, out: CompletionOutput) -> None:
        self.flush()
        if out.finished:
            # The choice is over: its hook goes before anyone sees the end (a consumer that acts on the final
            # output, e.g. the next request, finds the context as it was).
            self._unhook()
            self._emit(out)
        elif self._hooked:
            self._pending = out
        else:
            self._emit(out)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._emit(pending)

    def close(self) -> None:
        """The choice ended (or failed): the context's own decode is back, and what is pending goes now."""
        self._unhook()
        self.flush()

    def _unhook(self) -> None:
        if self._hooked:
            del self._ctx.decode  # the instance attribute only: the class method shows through again
            self._hooked = False
