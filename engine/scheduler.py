"""Continuous batching, vLLM v1 style: every step hands out tokens under a budget.

There are no prefill/decode phases. Each sequence knows num_computed_tokens; a step gives each running
sequence (oldest first) what it still lacks — one token for a decode, a chunk for a prefill — until the
token budget or the sequence cap is spent, then admits waiting sequences (FCFS) the same way. When
blocks run out, the newest running sequence is preempted: its blocks are dropped and it recomputes
later (its full blocks usually come back as prefix-cache hits). Pure Python.
"""

from __future__ import annotations

from collections import deque

from gearshift.engine.block_manager import BlockManager
from gearshift.engine.errors import InvalidRequestError
from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from gearshift.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first: preemption takes from the end
        self.seqs: dict[int, Sequence] = {}  # every unfinished sequence by id
        self.num_preemptions = 0

    # -- admission checks ----------------------------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, max_tokens: int, n: int = 1) -> None:
        """Raise InvalidRequestError for a request that could never run, before it is queued."""
        if n > self.max_num_seqs:
            raise InvalidRequestError(
                f"n={n} exceeds the engine's max_num_seqs={self.max_num_seqs}", param="n")
        longest = min(num_prompt_tokens + max_tokens, self.max_model_len)
        need = self.block_manager.blocks_for(longest)
        if need > self.block_manager.num_blocks:
            raise InvalidRequestError(
                f"the request needs up to {longest} tokens ({need} KV blocks) but the KV cache holds only "
                f"{self.block_manager.num_blocks} blocks of {self.block_manager.block_size} tokens",
                param="max_tokens" if num_prompt_tokens <= self.block_manager.num_blocks
                * self.block_manager.block_size else "prompt",
            )

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.seqs)

    # -- one step --------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Running sequences first (oldest first), then waiting ones, until the token budget is spent."""
        decodes: list[Sequence] = []  # one token each, sampled
        prefills: list[tuple[Sequence, int]] = []  # (sequence, new tokens this step)
        preempted: list[int] = []
        budget = self._schedule_decodes(self.max_num_batched_tokens, decodes)
        budget = self._schedule_running(budget, decodes, prefills, preempted)
        if not preempted:  # a step that had to preempt admits nothing: memory is short
            self._admit_waiting(budget, decodes, prefills)
        return self._output(decodes, prefills, preempted)

    def _schedule_decodes(self, budget: int, decodes: list[Sequence]) -> int:
        """The steady state in one tight pass: the leading running decodes that fit (a new block only when
        the last is full). The first sequence that is not a decode, or finds no block, is left to
        _schedule_running. Returns the budget left."""
        running = self.running
        if len(running) > min(budget, self.max_num_seqs):
            return budget
        bm = self.block_manager
        bs = bm.block_size
        for seq in running:
            computed = seq.num_computed_tokens
            if len(seq.token_ids) - computed != 1:
                break
            if computed >= len(seq.block_table) * bs and not bm.allocate(seq, 1):
                break
            decodes.append(seq)
        return budget - len(decodes)

    def _schedule_running(self, budget: int, decodes: list[Sequence], prefills: list[tuple[Sequence, int]],
                          preempted: list[int]) -> int:
        """The running sequences _schedule_decodes did not take: a decode or a prefill chunk each, preempting
        the newest when blocks run out. Sequences not reached (budget spent) simply wait a step. Returns the
        budget left."""
        running = self.running
        cap = self.max_num_seqs
        bs = self.block_manager.block_size
        i = len(decodes)
        while i < len(running) and budget > 0 and len(decodes) + len(prefills) < cap:
            seq = running[i]
            computed = seq.num_computed_tokens
            num_new = len(seq.token_ids) - computed
            if num_new == 1 and computed < len(seq.block_table) * bs:
                decodes.append(seq)  # the steady state: a decode whose last block has room, nothing to allocate
                budget -= 1
                i += 1
                continue
            num_new = min(num_new, budget)
            if num_new <= 0:
                i += 1  # nothing to run (should not happen: every running sequence has a token to feed)
                continue
            if not self._allocate_or_preempt(seq, num_new, preempted):
                continue  # seq itself was preempted: it was the last running one, the loop ends
            self._place(seq, num_new, decodes, prefills)
            budget -= num_new
            i += 1
        return budget

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, preempted: list[int]) -> bool:
        """Blocks for `num_new` more tokens of `seq`, preempting the newest running sequences until they
        fit; False when `seq` itself had to go."""
        while not self.block_manager.allocate(seq, num_new):
            victim = self.running.pop()  # the newest
            self._preempt(victim)
            preempted.append(victim.seq_id)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, budget: int, decodes: list[Sequence],
                       prefills: list[tuple[Sequence, int]]) -> None:
        """Waiting sequences, FCFS, while the budget, the sequence cap and the free blocks allow."""
        bm = self.block_manager
        running = self.running
        cap = self.max_num_seqs
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(running) >= cap or len(decodes) + len(prefills) >= cap:
                break
            if not seq.admissible:  # an n > 1 sibling waits for the shared prompt (then hits its blocks)
                break
            hits = bm.lookup(seq) if not seq.block_table else []
            num_new = min(seq.num_tokens - seq.num_computed_tokens - len(hits) * bm.block_size, budget)
            if not bm.allocate(seq, num_new, hits):
                break
            if not seq.num_cached_tokens and seq.num_preemptions == 0:
                seq.num_cached_tokens = len(hits) * bm.block_size
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            running.append(seq)
            self._place(seq, num_new, decodes, prefills)
            budget -= num_new

    @staticmethod
    def _place(seq: Sequence, num_new: int, decodes: list[Sequence], prefills: list[tuple[Sequence, int]]) -> None:
        """A decode is one token that reaches the sequence's end; anything else is a prefill chunk."""
        if num_new == 1 and seq.num_computed_tokens + 1 == len(seq.token_ids):
            decodes.append(seq)
        else:
            prefills.append((seq, num_new))

    @staticmethod
    def _output(decodes: list[Sequence], prefills: list[tuple[Sequence, int]], preempted: list[int]) -> SchedulerOutput:
        """Decodes first, then prefill chunks. Block tables are the sequences' own lists, not copies: they
        change only in schedule(), and the runner reads them before the next one."""
        seqs = [ScheduledSeq(seq.seq_id, [seq.token_ids[-1]], seq.num_computed_tokens, seq.block_table, True)
                for seq in decodes]
        for seq, num_new in prefills:
            start = seq.num_computed_tokens
            end = start + num_new
            seqs.append(ScheduledSeq(seq.seq_id, seq.token_ids[start:end], start, seq.block_table,
                                     end == len(seq.token_ids)))
            decodes.append(seq)  # now every scheduled sequence, in the order of seqs
        return SchedulerOutput(seqs=seqs, preempted_seq_ids=preempted, num_decodes=len(seqs) - len(prefills),
                               scheduled=decodes)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: drop the blocks (cached full ones stay findable), back to the queue's front."""
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def on_step_done(self, out: SchedulerOutput) -> None:
        """The runner computed the step: advance each sequence and register its newly full blocks."""
        bm = self.block_manager
        bs = bm.block_size if bm.enable_prefix_caching else 0
        finished = SequenceStatus.FINISHED
        if out.num_decodes == len(out.seqs) == len(out.scheduled):  # pure decode: each advanced by its one token
            for seq in out.scheduled:
                if seq.status is finished:
                    continue
                end = seq.num_computed_tokens + 1  # its ScheduledSeq's start_pos + 1 (nothing moved it since)
                seq.num_computed_tokens = end
                if bs and end // bs > seq.num_registered_blocks:
                    bm.cache_full_blocks(seq)
            return
        seqs = out.scheduled if len(out.scheduled) == len(out.seqs) else [self.seqs.get(s.seq_id) for s in out.seqs]
        for seq, s in zip(seqs, out.seqs, strict=True):
            if seq is None or seq.status is finished:
                continue
            end = s.start_pos + len(s.token_ids)
            seq.num_computed_tokens = end
            if bs and end // bs > seq.num_registered_blocks:  # a block filled up (else nothing to register)
                bm.cache_full_blocks(seq)

    # -- lifecycle -------------------------------------------------------------------------------------
    def finish(self, seq: Sequence) -> None:
        """Stopped, hit its length or aborted: free its blocks at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        self.seqs.pop(seq.seq_id, None)
