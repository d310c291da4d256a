"""The contract between the paged engine (llm_engine.py) and its model runner: everything LLMEngine reads.

ModelRunner (model_runner.py) implements it on CPU and GPU; bench/host_overhead.py wraps one to time it.
No torch at import time: the engine's host-side code (scheduler, block manager) stays device-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from gearshift.engine.scheduler_output import SchedulerOutput
    from gearshift.engine.tokenizer import Tokenizer


class Runner(Protocol):
    tokenizer: Tokenizer  # encode/decode/apply_chat_template/eos_token_ids
    max_model_len: int  # prompt + output tokens one sequence may hold
    vocab_size: int  # logits width
    num_kv_blocks: int  # blocks in the preallocated KV cache (ids 0 .. num_kv_blocks - 1)
    block_size: int  # tokens per block

    def execute(self, out: SchedulerOutput, prev_ids: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [seqs of `out` with sample=True, vocab_size], rows in out.seqs order. Each
        ScheduledSeq.block_table covers positions [0, start_pos + len(token_ids)); afterwards the cache
        holds K/V for every scheduled token at its slot and nothing else is written. An empty `out` (no
        seqs) returns [0, vocab_size]. prev_ids (async scheduling, engine/async_step.py): int64
        [out.num_decodes] on the device, aligned with the decode rows; a decode whose token in out is
        sequence.PLACEHOLDER is fed prev_ids' entry instead. The runner must not read them on the host."""
        ...
