"""One sequence the scheduler moves through the engine: its tokens, how many are in the KV cache, its blocks.

A request with n > 1 is n sequences from the start (`fan_out`): the first computes the prompt, the others
wait for it and then find its full blocks in the prefix cache, so nothing is forked mid-step and no block
is ever written by two sequences. Pure Python: the block manager and scheduler work on these alone.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any

from gearshift.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()

# The token a row of an in-flight step will have produced (async scheduling, engine/async_step.py puts it in
# token_ids until the step's ids reach the host); never a real id (they are >= 0). Here, beside the tokens,
# so that the sampler and the runner that read it do not import the async step (which imports them).
PLACEHOLDER = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    FINISHED = "finished"  # stopped, hit its length, or aborted; holds nothing


class Sequence:
    # Slots: the attributes sit inline in the object, so the per-row loops of a step (schedule, input prep,
    # on_step_done, the token loop), which mostly meet it cold after the forward, read one block of memory.
    __slots__ = ("seq_id", "request_id", "index", "params", "prompt_token_ids", "token_ids", "num_prompt_tokens",
                 "num_computed_tokens", "block_table", "block_hashes", "num_registered_blocks", "num_cached_tokens",
                 "status", "max_tokens", "first_sibling", "num_preemptions", "rng_key", "plain_greedy", "owner")

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        max_tokens: int | None = None,
    ) -> None:
        self.seq_id: int = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n choices this is
        self.params = params
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + every sampled token
        self.num_prompt_tokens = len(prompt_token_ids)
        # Tokens whose K/V are in the cache. Decoding means num_tokens - num_computed_tokens == 1.
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Hashes of this sequence's full blocks, in order, once registered (block i covers tokens
        # [i*bs, (i+1)*bs)). Kept across preemption: tokens do not change, so neither do the hashes.
        self.block_hashes: list[int] = []
        self.num_registered_blocks = 0  # leading blocks cache_full_blocks has already seen (a fast path)
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.status = SequenceStatus.WAITING
        self.max_tokens = max_tokens if max_tokens is not None else params.max_tokens
        # n > 1: choices 1.. are admitted only once choice 0 has computed the prompt (then they hit its blocks).
        self.first_sibling: Sequence | None = None
        self.num_preemptions = 0
        # The 64-bit key of this sequence's random stream (engine/sampler_ops.py), set by the sampler at its
        # first draw.
        self.rng_key: int | None = None
        # Greedy, no penalties, logprobs or logit_bias: the sampler's one-argmax fast path. Read every step
        # for every row, so it is decided once here (params do not change once the request is queued).
        self.plain_greedy: bool = params.plain_greedy and not params.logit_bias
        # The engine's record of this sequence's choice (request_state.ChoiceState), set when queued: the
        # engine reads it for every row every step instead of looking the request up by id. Opaque here.
        self.owner: Any = None

    # -- token views -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    @property
    def admissible(self) -> bool:
        """False while this is a sibling whose first sibling is running and still computing the shared prompt
        (a waiting first sibling never blocks: that could deadlock behind a preemption)."""
        first = self.first_sibling
        return (first is None or first.status is not SequenceStatus.RUNNING
                or first.num_computed_tokens >= first.num_prompt_tokens)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}, idx={self.index}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table}, {self.status.value})"
        )


def fan_out(request_id: str, prompt_token_ids: list[int], params: SamplingParams,
            max_tokens: int | None = None) -> list[Sequence]:
    """The n sequences of one request, choice k at index k; choices 1.. wait on choice 0's prompt."""
    seqs = [Sequence(request_id, prompt_token_ids, params, index=k, max_tokens=max_tokens) for k in range(params.n)]
    for s in seqs[1:]:
        s.first_sibling = seqs[0]
    return seqs
