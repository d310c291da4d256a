"""The contract between the scheduler (pure Python) and the model runner (the only device code).

Each step the scheduler hands out tokens under a budget: a decode is one token, a prefill chunk is many;
both kinds go in one step (vLLM v1 style: no prefill/decode phases, each sequence has num_computed_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gearshift.engine.sequence import Sequence


@dataclass(slots=True)  # slots: hundreds are built every step
class ScheduledSeq:
    seq_id: int
    token_ids: list[int]  # the tokens to feed this step: a prefill chunk, or the one last sampled token
    start_pos: int  # position of token_ids[0]; equals the sequence's num_computed_tokens
    # Physical KV blocks covering positions [0, start_pos + len(token_ids)): the sequence's own list (no
    # copy), valid until the next schedule().
    block_table: list[int]
    sample: bool  # True when this chunk reaches the sequence's last known token: sample the next one

    @property
    def context_len(self) -> int:
        """Tokens in the KV cache after this step for this sequence."""
        return self.start_pos + len(self.token_ids)


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)  # decodes first, then prefill chunks
    preempted_seq_ids: list[int] = field(default_factory=list)  # lost their blocks; will recompute
    num_decodes: int = 0  # seqs[:num_decodes] are decodes (one token each, sampled)
    # The scheduler's own Sequence objects, in the order of seqs (so the engine and on_step_done need no
    # lookup by id); empty when the output was built by hand (tests, warm-up).
    scheduled: list[Sequence] = field(default_factory=list, compare=False, repr=False)

    def __getstate__(self) -> dict:
        """Tensor-parallel ranks get the schedule pickled: the Sequence objects (params, grammar, generators)
        stay on rank 0."""
        return {**self.__dict__, "scheduled": []}

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs
