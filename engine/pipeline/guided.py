"""Guided decoding: a request's output format (JSON schema, any JSON object, regex, choice, Lark) as a
grammar, and one matcher per choice that says which tokens may come next.

The grammar engine is llguidance (see the README's "Structured outputs" for the measurement behind the
choice). Everything here is engine-independent: an engine hands over its vocabulary once
(`vocab_from_hf_json` / `vocab_from_llama`), the request pipeline compiles a `Guide` per request before
admission (a bad schema is a 400, never a failed step), and each engine then only asks a guide for its
token mask and tells it the token it sampled.

    guide = compile_guide(GuidedSpec("json_schema", schema), vocab)   # on the event loop
    g = guide.fork()                                                  # one per choice
    mask = fill_bitmask([g, ...], vocab_size)                         # int32 [B, ceil(V/32)]
    g.accept(token_id)

A batched engine fills its rows with a MaskFiller instead: in the background and in parallel, so the
fill overlaps the model's forward pass (vLLM's shape):

    pending = filler.start([g, ...])        # before the forward; the guides are not touched until result()
    logits = forward(...)
    mask = pending.result()                 # int32 [B, ceil(V/32)]
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from gearshift.engine.errors import InvalidRequestError

GuideKind = Literal["json_object", "json_schema", "regex", "choice", "lark"]

# Compact JSON: no free whitespace. A small model given free whitespace can emit newlines forever
# inside a valid document; OpenAI's own structured outputs are compact too.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


@dataclass(frozen=True)
class GuidedSpec:
    """What the output must look like, as the API said it (the `param` names the field for errors)."""

    kind: GuideKind
    value: Any = None  # schema dict | regex str | list of choices | lark str
    strict: bool = True  # json_schema: unsupported keywords are a 400 (else ignored)
    param: str = "response_format"

    def grammar(self) -> str:
        """The llguidance grammar (a JSON string) for this spec."""
        from llguidance import LLMatcher

        try:
            if self.kind == "json_object":
                return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
            if self.kind == "json_schema":
                if not isinstance(self.value, dict):
                    raise InvalidRequestError("the JSON schema must be an object", param=self.param)
                return LLMatcher.grammar_from_json_schema(
                    self.value, defaults={**_JSON_OPTIONS, "lenient": not self.strict})
            if self.kind == "regex":
                return LLMatcher.grammar_from_regex(str(self.value))
            if self.kind == "choice":
                choices = [str(c) for c in self.value or []]
                if not choices:
                    raise InvalidRequestError("guided_choice needs at least one choice", param=self.param)
                return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
            return LLMatcher.grammar_from_lark(str(self.value))
        except (ValueError, TypeError, RuntimeError) as e:  # the grammar engine's word on a bad spec
            raise InvalidRequestError(f"invalid {self.kind}: {e}", param=self.param) from None


class Guide:
    """One choice's position in its grammar (an llguidance matcher)."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def fork(self) -> Guide:
        """A fresh copy at the same position (choices of one request, each from the start)."""
        return Guide(self.matcher.deep_copy())

    def accept(self, token_id: int) -> bool:
        """Advance past the sampled token; False if the grammar does not allow it (it then stays in error)."""
        if self.matcher.is_stopped():
            return True  # the EOS after a complete document
        return bool(self.matcher.consume_token(token_id))

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed-token bitmask (int32 words, bit t%32 of word t//32) into `row` [W]."""
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.size * row.itemsize)

    @property
    def finished(self) -> bool:
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return self.matcher.get_error() if self.matcher.is_error() else ""


def vocab_from_hf_json(tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]) -> Any:
    """The grammar engine's view of a HF `tokenizers` vocabulary (the paged engine's); ~0.3 s, cache it."""
    from llguidance import LLTokenizer

    return LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))


def vocab_from_llama(vocab_ptr: Any, eos_token_ids: list[int]) -> Any:
    """The grammar engine's view of a llama.cpp vocabulary (the gguf engine's); ~0.3 s, cache it."""
    from llguidance.llamacpp import lltokenizer_from_vocab

    return lltokenizer_from_vocab(vocab_ptr, eos_token=list(eos_token_ids))


def compile_guide(spec: GuidedSpec, vocab: Any) -> Guide:
    """Compile `spec` for `vocab`; a grammar the engine cannot build is an InvalidRequestError (400)."""
    from llguidance import LLMatcher

    try:
        matcher = LLMatcher(vocab, spec.grammar(), log_level=0)
    except (ValueError, TypeError, RuntimeError) as e:
        raise InvalidRequestError(f"cannot use this {spec.kind}: {e}", param=spec.param) from None
    if matcher.is_error():
        raise InvalidRequestError(f"cannot use this {spec.kind}: {matcher.get_error()}", param=spec.param)
    return Guide(matcher)


class GuideCache:
    """Compiled guides by spec, most recently used kept: clients send the same schema on every request, so
    a repeat is a fork of the kept guide, with no compile on the event loop, and the forks share the
    grammar's lexer, already warm (a fresh compile builds its lexer states again, mask by mask)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._guides: OrderedDict[tuple[Any, ...], tuple[Any, Guide]] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GuidedSpec, vocab: Any) -> Guide:
        """A fresh guide at the start of `spec`'s grammar (InvalidRequestError as compile_guide)."""
        key = (id(vocab), spec.kind, json.dumps(spec.value, sort_keys=True, default=repr), spec.strict)
        with self._lock:
            kept = self._guides.get(key)
            if kept is not None and kept[0] is vocab:
                self._guides.move_to_end(key)
                return kept[1].fork()
        guide = compile_guide(spec, vocab)
        with self._lock:
            self._guides[key] = (vocab, guide)  # never advanced itself: only its forks are
            while len(self._guides) > self.size:
                self._guides.popitem(last=False)
        return guide.fork()

    def __len__(self) -> int:
        return len(self._guides)


def mask_threads() -> int:
    """Fill threads: half this process's CPUs, at most 8 (a row takes ~2-20 us; the rest run the model)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) // 2))


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_bitmask(guides: list[Guide], vocab_size: int) -> np.ndarray:
    """int32 [len(guides), ceil(vocab_size/32)]: each guide's allowed tokens (bit set = allowed)."""
    mask = np.zeros((len(guides), bitmask_words(vocab_size)), dtype=np.int32)
    for i, g in enumerate(guides):
        g.fill(mask[i])
    return mask


class MaskFiller:
    """Fills a batch's bitmask rows on llguidance's own thread pool (the GIL released for the whole batch),
    started from one background thread so that the caller's forward pass runs meanwhile. One batch at a
    time: a guide must not be advanced or filled elsewhere until its batch's result() returned."""

    def __init__(self, vocab_size: int, threads: int | None = None) -> None:
        from llguidance import LLExecutor

        self.words = bitmask_words(vocab_size)
        self._executor = LLExecutor(threads or mask_threads())
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")

    def start(self, guides: list[Guide]) -> Future[np.ndarray]:
        """Begin filling int32 [len(guides), W]: row i is guides[i]'s allowed tokens."""
        mask = np.zeros((len(guides), self.words), dtype=np.int32)
        matchers = [(g.matcher, i) for i, g in enumerate(guides)]
        return self._thread.submit(self._fill, matchers, mask)

    def _fill(self, matchers: list[tuple[Any, int]], mask: np.ndarray) -> np.ndarray:
        self._executor.unsafe_compute_mask_ptr(matchers, mask.ctypes.data, mask.shape[1] * mask.itemsize,
                                               mask.shape[0])
        return mask

    def close(self) -> None:
        self._thread.shutdown(wait=True)
