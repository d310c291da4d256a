"""Async scheduling: step N+1 is scheduled and launched before step N's sampled token ids reach the host.

The idea is vLLM v1's async scheduler (vllm/v1/core/sched/async_scheduler.py; the runner's
`prev_sampled_token_ids`), kept small. The engine holds at most one launched step (InFlight). Its next
step() assumes each of that step's rows produced exactly one token: it appends a PLACEHOLDER to each
row's sequence, schedules (every row is then a one-token decode), and launches the new step with its decodes' input ids
taken from the previous step's sampled ids where they are, on the device (no host round trip). Only then
does it wait for the previous step's ids on the host, drop the placeholders and run the usual token loop
(stop tokens, max_tokens, outputs). A row of the new step whose request finished in the old one (or was
aborted, or stopped by a stop string, in between) computes one token nobody reads: the token loop skips
finished sequences, and their blocks were freed as usual (the device runs steps in launch order, so a
freed block is written by the stale row before anyone else can use it).

It holds only where the result is known to equal the synchronous engine's:
- a step is launched async only if every sampled row samples on the device: greedy or drawn (temperature,
  top-k/top-p/min-p, seeded or not: the race's noise is keyed by sequence and position, not by the batch),
  with penalties (a placeholder's token is read from the device ids), logit_bias and logprobs (their
  top-n values travel with the ids); not a grammar row (its mask needs the previous token on the host);
- the step after an in-flight one continues async only if its decodes are all rows of the in-flight step
  (no running sequence mid-prefill or left out by the budget) and any request it could admit samples on
  the device too (can_continue); admitted prefills feed host ids as usual. Otherwise the in-flight step
  is finished first and the next step() runs synchronously.
Preemption is safe: a preempted row keeps its placeholder until the token loop replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gearshift.engine.sequence import PLACEHOLDER

if TYPE_CHECKING:
    import torch
    from gearshift.engine.outputs import Logprob
    from gearshift.engine.sampler import LogprobRows
    from gearshift.engine.scheduler import Scheduler
    from gearshift.engine.scheduler_output import SchedulerOutput
    from gearshift.engine.sequence import Sequence


def resolve_async(mode: str, device_type: str, tensor_parallel_size: int) -> bool:
    """EngineConfig.async_scheduling -> whether the engine schedules ahead. auto: CUDA only (on a CPU the
    forward is synchronous and the host work shares its cores: nothing overlaps). Never with tensor
    parallelism: the other ranks get the schedule pickled, not the previous step's device ids."""
    if mode == "off" or tensor_parallel_size > 1:
        return False
    return mode == "on" or device_type == "cuda"


def samples_on_device(targets: list[Sequence]) -> bool:
    """The sampler's ids can stay on the device (Sampler.device_ids): no row has a grammar (its mask needs
    the previous token on the host). Greedy, temperature, top-k/top-p/min-p, seeds, penalties, logit_bias
    and logprobs all run there."""
    for seq in targets:
        if seq.params.guide is not None:  # a choice's grammar (owner.guide) is a fork of it: one check for both
            return False
    return True


class HostIds:
    """A step's sampled ids [R] (and its logprob rows' values, the sampler's LogprobRows) on their way to the
    host. On CUDA non-blocking copies into pinned memory plus an event, so the next step is launched before
    they arrive; on a CPU they are already here."""

    def __init__(self, ids: torch.Tensor, logprobs: LogprobRows | None = None) -> None:
        self.event = None
        self.logprob_rows = logprobs
        tensors = [ids, *(logprobs.tensors if logprobs is not None else ())]
        if ids.is_cuda:
            import torch

            tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                       for t in tensors]
            self.event = torch.cuda.Event()
            self.event.record()
        self.host, *self.extra = tensors

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()  # only this step's copies, not the step launched after it
        return self.host.tolist()

    def logprobs(self, token_ids: list[int]) -> list[Logprob | None]:
        """After tolist(): each row's Logprob (None where the request asked for none)."""
        if self.logprob_rows is None:
            return [None] * len(token_ids)
        return self.logprob_rows.build(token_ids, *(t.tolist() for t in self.extra))


@dataclass
class InFlight:
    """A launched step whose sampled ids have not been read on the host yet."""

    out: SchedulerOutput  # its schedule (on_step_done runs at the next step(), before the next schedule)
    targets: list[Sequence]  # its sampled rows, in logits order
    token_ids: torch.Tensor  # [len(targets)] int64 on the device: the next step's input ids
    host: HostIds  # the same ids, copied to the host
    row_of: dict[int, int]  # seq_id -> its row in token_ids


def launched(out: SchedulerOutput, targets: list[Sequence], token_ids: torch.Tensor,
             logprobs: LogprobRows | None = None) -> InFlight:
    return InFlight(out, targets, token_ids, HostIds(token_ids, logprobs), {s.seq_id: i for i, s in enumerate(targets)})


def can_continue(flight: InFlight, scheduler: Scheduler) -> bool:
    """May the next step be launched before `flight`'s ids reach the host? With a placeholder on each of
    flight's rows, every running sequence must be one of those rows (a decode whose input id is in
    flight.token_ids; not mid-prefill, not left out by the budget), and whatever waiting sequence could
    be admitted (a prefill from host ids) must sample on the device too."""
    row_of = flight.row_of
    if not all(seq.seq_id in row_of for seq in scheduler.running):
        return False
    return (not scheduler.waiting or len(scheduler.running) >= scheduler.max_num_seqs
            or samples_on_device(scheduler.waiting))


def add_placeholders(flight: InFlight) -> None:
    """Each live row of the flight will have one more token: a decode for the scheduler."""
    for seq in flight.targets:
        if not seq.is_finished:
            seq.token_ids.append(PLACEHOLDER)


def drop_placeholders(flight: InFlight) -> None:
    """Before the token loop (which appends the real ids) or any output is built. Idempotent."""
    for seq in flight.targets:
        toks = seq.token_ids
        if toks[-1] == PLACEHOLDER:
            toks.pop()


def next_input_ids(flight: InFlight, out: SchedulerOutput) -> torch.Tensor:
    """flight's device ids [num_decodes] aligned with `out`'s decode rows (they come first in the flat
    batch); the runner takes them where out holds a PLACEHOLDER (a row of any other decode, admitted with
    one token left, reads 0 here and keeps its own id). The same tensor when the rows are flight's, in
    its order (the steady state)."""
    get = flight.row_of.get
    rows = [get(seq.seq_id, 0) for seq in out.scheduled[:out.num_decodes]]
    if len(rows) == len(flight.targets) and rows == list(range(len(rows))):
        return flight.token_ids
    import torch

    ids = flight.token_ids
    idx = torch.tensor(rows, dtype=torch.int64)
    if ids.is_cuda:  # pinned, non-blocking: nothing here may wait for the step still running
        idx = idx.pin_memory().to(ids.device, non_blocking=True)
    return ids.index_select(0, idx)
