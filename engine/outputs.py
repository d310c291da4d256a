"""Outputs the engines hand to callers (offline API and the server). One contract for both engines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class Logprob:
    """One sampled position: the chosen token's logprob and the top-N alternatives."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # token id -> logprob, best first


@dataclass
class CompletionOutput:
    """One of the n choices of a request. `text` and `token_ids` are cumulative."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token that ended it, if any
    logprobs: list[Logprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after a step: every choice so far. Servers diff it to stream deltas."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None  # when it left the waiting queue
    first_token_time: float | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.outputs[0].finish_reason


@dataclass
class EngineStats:
    """A point-in-time view for /metrics and the operator's autoscaling. Same fields for both engines."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1, blocks in use by running requests / total
    num_total_blocks: int = 0
    num_free_blocks: int = 0  # free or cached-and-unreferenced
    num_preemptions: int = 0  # cumulative
    prefix_cache_queries: int = 0  # cumulative, in tokens
    prefix_cache_hits: int = 0  # cumulative, in tokens
