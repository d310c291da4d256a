"""Request intake for the paged engine: a prompt and its SamplingParams checked, then built into the
RequestState that LLMEngine queues (llm_engine.py).

    intake = RequestIntake(tokenizer, vocab_size, max_model_len, scheduler)
    req = intake.prepare("r1", "Hello", SamplingParams(max_tokens=8), None, running=engine_requests)

Every check runs before anything is queued, so a bad request leaves no trace: an InvalidRequestError names
the field. Nothing here changes the scheduler or the KV cache (Scheduler.check_fits only reads their sizes);
the engine calls it under its lock.
"""

from __future__ import annotations

import time
from collections.abc import Container
from typing import TYPE_CHECKING

from gearshift.engine.errors import InvalidRequestError
from gearshift.engine.pipeline.request_checks import check_token_ids, context_budget
from gearshift.engine.request_state import ChoiceState, RequestState
from gearshift.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from gearshift.engine.scheduler import Scheduler
    from gearshift.engine.tokenizer import Tokenizer


class RequestIntake:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, scheduler: Scheduler) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.scheduler = scheduler
        self._stop_sets: dict[tuple[tuple[int, ...], bool], frozenset[int]] = {}  # see stop_set

    def prepare(self, request_id: str, prompt: str | list[int], params: SamplingParams | None,
                arrival_time: float | None, running: Container[str]) -> RequestState:
        """Every check LLMEngine.add_request makes, without queuing; `running`: the ids now in the engine."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be SamplingParams, got {type(params).__name__}",
                                      param="sampling_params")
        params.validate()
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string", param="request_id")
        if request_id in running:
            raise InvalidRequestError(f"request_id {request_id!r} is already running", param="request_id")
        ids = self.prompt_ids(prompt)
        max_tokens = context_budget(len(ids), params.max_tokens, self.max_model_len)
        self.scheduler.check_fits(len(ids), max_tokens, params.n)
        req = RequestState(request_id, ids, params, max_tokens, arrival_time if arrival_time is not None else time.time())
        req.stops, req.n = self.stop_set(params), params.n
        req.choices = [ChoiceState(k, logprobs=[] if params.logprobs is not None else None,
                               guide=params.guide.fork() if params.guide is not None else None)
                       for k in range(params.n)]
        return req

    def stop_set(self, params: SamplingParams) -> frozenset[int]:
        """The token ids that end a choice of `params`; one shared set per distinct kind (fewer objects for
        the token loop to touch)."""
        key = (tuple(params.stop_token_ids), params.ignore_eos)
        stops = self._stop_sets.get(key)
        if stops is None:
            eos = () if params.ignore_eos else self.tokenizer.eos_token_ids
            stops = self._stop_sets.setdefault(key, frozenset(params.stop_token_ids) | frozenset(eos))
            if len(self._stop_sets) > 1024:  # bounded: clients choose stop_token_ids
                self._stop_sets.clear()
        return stops

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids: a string encoded, a list checked against the vocabulary; never empty."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise InvalidRequestError("the prompt encodes to no tokens", param="prompt")
            return ids
        if not isinstance(prompt, (list, tuple)):
            raise InvalidRequestError(f"the prompt must be a string or a list of token ids, got {type(prompt).__name__}",
                                      param="prompt")
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        check_token_ids(list(prompt), self.vocab_size, "prompt")
        return list(prompt)
