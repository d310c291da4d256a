"""The paged engine's record of each request while it runs, and the token-level output it reports.

LLMEngine (llm_engine.py) keeps one RequestState per request and one ChoiceState per choice; each of the
request's Sequences points back at its ChoiceState (`Sequence.owner`), so the per-row token loop of a
step needs no lookup by id. Plain data and one pure function: no engine, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gearshift.engine.outputs import CompletionOutput, FinishReason, Logprob, RequestOutput
from gearshift.engine.sampling_params import SamplingParams
from gearshift.engine.sequence import Sequence


@dataclass
class Sampled:
    token_ids: list[int | None]  # None: that row's request failed while sampling
    logprobs: list[Logprob | None]


@dataclass(slots=True)  # attributes inline: the token loop reads them every step, mostly from cold cache
class ChoiceState:
    index: int
    seq: Sequence | None = None  # set when the request is queued; its output tokens are this choice's
    logprobs: list[Logprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    guide: Any = None  # this choice's grammar position (SamplingParams.guide forked), or None
    req: RequestState | None = field(default=None, repr=False, compare=False)  # set when queued (a cycle)

    @property
    def token_ids(self) -> list[int]:
        """The tokens sampled so far, a copy (the sequence holds them: the token loop appends once)."""
        seq = self.seq
        return seq.token_ids[seq.num_prompt_tokens:] if seq is not None else []


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    arrival_time: float
    choices: list[ChoiceState] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    stops: frozenset[int] = frozenset()  # token ids that end a choice: stop_token_ids, and EOS unless ignore_eos
    n: int = 1  # choices (params.n), here so the token loop need not reach `choices` or `params`

    @property
    def finished(self) -> bool:
        choices = self.choices
        if len(choices) == 1:  # read for every request every step: n = 1 without a generator
            return choices[0].finish_reason is not None
        return all(c.finish_reason is not None for c in choices)


def build_output(req: RequestState, only: ChoiceState | None = None) -> RequestOutput:
    """Token ids only (text is the output processor's): cumulative, a fresh object every step. Arguments
    are positional, in outputs.py's field order: this runs for every request every step, and keyword
    arguments made each dataclass construction ~3x slower (0.42 vs 0.13 us). `only`: the choice of an n = 1
    request (the token loop has it at hand), built without reaching `req.choices` or looping."""
    choices = req.choices
    if only is not None or len(choices) == 1:
        c = only if only is not None else choices[0]
        seq = c.seq
        outs = [CompletionOutput(c.index, "", seq.token_ids[seq.num_prompt_tokens:] if seq is not None else [],
                                 c.finish_reason, c.stop_reason, None if c.logprobs is None else list(c.logprobs))]
        done = c.finish_reason is not None
    else:
        outs = [CompletionOutput(c.index, "", c.token_ids, c.finish_reason, c.stop_reason,
                                 None if c.logprobs is None else list(c.logprobs)) for c in choices]
        seq = choices[0].seq
        done = req.finished
    return RequestOutput(req.request_id, req.prompt_token_ids, outs, done,
                         seq.num_cached_tokens if seq is not None else 0, req.arrival_time,
                         req.first_scheduled_time, req.first_token_time)
