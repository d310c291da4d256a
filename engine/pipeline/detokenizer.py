"""Output text, written once for both engines: token ids in, text out (vLLM v1's output processor shape).

The engines only turn token ids into token ids: they end a choice on a token (EOS, a stop token id,
max_tokens) or an abort, never on text. Everything about text happens here, on the consumer's side of the
engine (the server's event loop for both backends; inside `LLMEngine.step` only for the offline API):

  * incremental detokenization that never splits a UTF-8 character across chunks (`IncrementalDetokenizer`);
  * stop strings: the earliest match reaching into new text ends the choice and is cut from it (unless
    include_stop_str_in_output); the engine is then told to finish that choice, so it may have computed
    a token or two more, which are dropped here (token_ids, logprobs and usage end at the stop);
  * hold-back: text that is, so far, the start of a stop string is not streamed until it cannot be one;
  * one output per token (`OutputProcessor.process` expands an engine output that carries several new
    tokens, because the consumer fell behind), so a greedy request streams the same chunks on every
    engine and at any load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from gearshift.engine.outputs import CompletionOutput, FinishReason, Logprob, RequestOutput
from gearshift.engine.sampling_params import SamplingParams

Decode = Callable[[list[int]], str]  # token ids -> text, special tokens skipped, bad UTF-8 as U+FFFD


def find_stop(text: str, stops: list[str], search_from: int) -> tuple[int, str] | None:
    """Earliest (position, stop string) of any stop string that ends at or after `search_from` (text up to
    there was searched before)."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, max(0, search_from - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters could still be the start of a stop string: not streamed yet. Only an
    actual partial match is held (vLLM holds max(len(stop)) - 1 characters always, which delays every
    chunk; this one only delays text that may really be cut)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


class IncrementalDetokenizer:
    """Turns one new token id at a time into new text, holding back bytes of an unfinished UTF-8 character.

    Decoding a window [prefix, read) and [prefix, end) and emitting the difference keeps tokenizer-level
    spacing right (SentencePiece's leading-space rule) without re-decoding the whole output each step; a
    window ending in U+FFFD is an unfinished character: its bytes wait for the next token.
    """

    def __init__(self, decode: Decode, prompt_ids: list[int] | None = None) -> None:
        self._decode = decode
        ctx = list(prompt_ids or [])[-6:]  # a little prompt context, so the first token spaces right
        self._ids: list[int] = ctx
        self._prefix = 0
        self._read = len(ctx)
        self.text = ""  # all text emitted so far

    def add(self, token_id: int) -> str:
        """Append one token; return the newly complete text (possibly "")."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if full.endswith("\ufffd") or len(full) <= len(prefix_text):
            return ""  # an incomplete UTF-8 sequence (or nothing visible yet): wait for more tokens
        delta = full[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end: whatever is still held back (a genuinely broken byte sequence decodes to U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        full = self._decode(self._ids[self._prefix :])
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        delta = full[len(prefix_text) :] if len(full) > len(prefix_text) else ""
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta


class ChoiceText:
    """One choice's text as its tokens arrive: detokenization, stop strings, the hold-back rule."""

    def __init__(self, decode: Decode, prompt_ids: list[int], params: SamplingParams, index: int) -> None:
        self.index = index
        self.params = params
        self.detok = IncrementalDetokenizer(decode, prompt_ids)
        self.text = ""  # everything decoded so far, cut at a stop string once found
        self.token_ids: list[int] = []
        self.logprobs: list[Logprob] | None = [] if params.logprobs is not None else None
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_id: int, logprob: Logprob | None, engine_finish: FinishReason | None = None,
            engine_stop_reason: str | int | None = None) -> None:
        """The next token, and how the engine ended the choice on it (None: it did not). An engine 'stop'
        is always on a token (EOS or a stop token id): that token counts but has no text."""
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if engine_finish != "stop" and self._grow(self.detok.add(token_id)):
            return
        if engine_finish is not None:
            self.end(engine_finish, engine_stop_reason)

    def end(self, finish: FinishReason, stop_reason: str | int | None = None) -> None:
        """The engine ended the choice: release bytes held back for an unfinished character (they may
        still complete a stop string, which then wins)."""
        if self.finish_reason is None and not self._grow(self.detok.flush()):
            self.finish_reason, self.stop_reason = finish, stop_reason

    def _grow(self, delta: str) -> bool:
        """Append new text; True if a stop string now ends the choice (the text is cut there)."""
        stops = self.params.stop
        if not delta:
            return False
        before = len(self.text)
        self.text += delta
        hit = find_stop(self.text, stops, before) if stops else None
        if hit is None:
            return False
        i, s = hit
        self.text = self.text[: i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
        self.finish_reason, self.stop_reason = "stop", s
        return True

    def snapshot(self) -> CompletionOutput:
        text = self.text
        if self.finish_reason is None and self.params.stop:
            text = text[: len(text) - stop_holdback(text, self.params.stop)]
        return CompletionOutput(index=self.index, text=text, token_ids=list(self.token_ids),
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason,
                                logprobs=list(self.logprobs) if self.logprobs is not None else None)


class OutputProcessor:
    """One request's outputs: the engine's token-level outputs (cumulative token ids, text empty) in, text
    outputs out, one per new token. `take_stopped()` names the choices a stop string ended, which the
    engine should stop computing."""

    def __init__(self, decode: Decode, prompt_ids: list[int], params: SamplingParams) -> None:
        self.choices = [ChoiceText(decode, prompt_ids, params, i) for i in range(params.n)]
        self._latest = [c.snapshot() for c in self.choices]  # each choice's newest output
        self._stopped: list[int] = []

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices)

    def process(self, out: RequestOutput) -> list[RequestOutput]:
        """Text outputs for the tokens `out` adds: one per token (an engine output that carries several,
        because its consumer fell behind, still gives one each), at least one."""
        new: dict[int, list[CompletionOutput]] = {}
        for engine_choice in out.outputs:
            c = self.choices[engine_choice.index]
            if c.finished:  # a stop string ended it here; the engine may not have heard yet
                continue
            new[c.index] = self._advance(c, engine_choice)
            if c.finish_reason == "stop" and engine_choice.finish_reason is None:
                self._stopped.append(c.index)
        results = []
        for r in range(max((len(s) for s in new.values()), default=0) or 1):
            for i, snaps in new.items():
                if r < len(snaps):
                    self._latest[i] = snaps[r]
            latest = list(self._latest)
            results.append(dataclasses.replace(out, outputs=latest, finished=all(s.finished for s in latest)))
        return results

    @staticmethod
    def _advance(c: ChoiceText, engine_choice: CompletionOutput) -> list[CompletionOutput]:
        """Feed the engine choice's new tokens one by one; a snapshot after each."""
        ids, lps = engine_choice.token_ids, engine_choice.logprobs
        snaps = []
        for k in range(len(c.token_ids), len(ids)):
            last = k == len(ids) - 1
            c.add(ids[k], lps[k] if lps is not None and k < len(lps) else None,
                  engine_choice.finish_reason if last else None, engine_choice.stop_reason if last else None)
            snaps.append(c.snapshot())
            if c.finished:
                return snaps
        if engine_choice.finish_reason is not None and not c.finished:  # ended without a new token
            c.end(engine_choice.finish_reason, engine_choice.stop_reason)
            snaps.append(c.snapshot())
        return snaps

    def take_stopped(self) -> list[int]:
        """Choices a stop string ended since the last call while the engine still runs them."""
        stopped, self._stopped = self._stopped, []
        return stopped


async def text_outputs(token_outputs: AsyncIterator[RequestOutput], processor: OutputProcessor,
                       finish_choice: Callable[[int], None]) -> AsyncIterator[RequestOutput]:
    """A backend's `generate` after admission: its engine's token outputs through `processor`. A choice a
    stop string ended is finished in the engine (`finish_choice`); once every choice has ended here, the
    engine's stream is closed, which aborts what is left of the request there."""
    async with aclosing(token_outputs) as outs:  # type: ignore[type-var]
        async for out in outs:
            results = processor.process(out)
            if not processor.finished:
                for index in processor.take_stopped():
                    finish_choice(index)
            for result in results:
                yield result
            if processor.finished:
                return
