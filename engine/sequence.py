"""One sequence the scheduler moves through the engine: its tokens, how many are in the KV cache, its blocks.

A request with n > 1 starts as one sequence; when its prompt is done the engine forks n - 1 siblings
that share the prompt's blocks. Pure Python: the block manager and scheduler work on these alone.
"""

from __future__ import annotations

import enum
import itertools

from gearshift.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    FINISHED = "finished"  # stopped, hit its length, or aborted; holds nothing


class Sequence:
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
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.status = SequenceStatus.WAITING
        self.max_tokens = max_tokens if max_tokens is not None else params.max_tokens
        # n > 1: the first sequence forks its siblings once its prompt is computed.
        self.pending_forks = params.n - 1 if index == 0 else 0
        self.num_preemptions = 0
        # Sampling state: a seeded request's torch.Generator (set by the sampler; opaque here).
        self.generator: object | None = None

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

    def fork(self, index: int) -> Sequence:
        """A sibling with the same tokens and computed state; the caller shares the blocks' references."""
        child = Sequence(self.request_id, self.prompt_token_ids, self.params, index=index, max_tokens=self.max_tokens)
        child.token_ids = list(self.token_ids)
        child.num_computed_tokens = self.num_computed_tokens
        child.block_table = list(self.block_table)
        child.block_hashes = list(self.block_hashes)
        child.num_cached_tokens = self.num_cached_tokens
        child.status = self.status
        return child

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}, idx={self.index}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table}, {self.status.value})"
        )
