"""One rank of a tensor-parallel paged engine.

TPModelRunner is a ModelRunner over this rank's shard (heads, MLP columns, vocabulary rows / tp) with the
collectives attached; its KV cache holds this rank's KV heads. Every rank runs the same steps in the same
order: rank 0's engine (scheduler, sampler) calls TPExecutor.execute, which broadcasts the step to the
workers (worker_loop) before running its own part; the all-gathered logits come back on rank 0.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from gearshift.engine.config import EngineConfig
from gearshift.engine.distributed.collectives import attach
from gearshift.engine.distributed.sharding import local_config, shard_weights
from gearshift.engine.model.config import ModelConfig
from gearshift.engine.model_runner import ModelRunner
from gearshift.engine.scheduler_output import SchedulerOutput


class _ShardedSource:
    """The loader's model source with every weight cut to one rank's part."""

    def __init__(self, src: Any, cfg: ModelConfig, rank: int, tp: int) -> None:
        self._src, self._cfg, self._rank, self._tp = src, cfg, rank, tp

    def weights(self):
        return shard_weights(self._src.weights(), self._cfg, self._rank, self._tp)


class TPModelRunner(ModelRunner):
    """model_config is this rank's shard's config; full_config the model's; vocab_size the full one."""

    def __init__(self, config: EngineConfig, rank: int, tp: int) -> None:
        self.rank, self.tp = rank, tp
        # CUDA graphs would capture the NCCL collectives; not proven on a multi-GPU machine yet: eager.
        super().__init__(replace(config, enforce_eager=True))

    def _load_model(self, src: Any, max_positions: int):
        self.full_config = self.model_config
        self.model_config = local_config(self.full_config, self.tp)
        model = super()._load_model(_ShardedSource(src, self.full_config, self.rank, self.tp), max_positions)
        attach(model, self.rank, self.tp, self.full_config.vocab_size)
        return model

    def _kv_budget(self) -> int:
        """The smallest rank's budget: every rank must hold the same block ids."""
        budget = torch.tensor([super()._kv_budget()], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            budget = budget.cuda()
        dist.all_reduce(budget, op=dist.ReduceOp.MIN)
        return int(budget.item())


class TPExecutor:
    """Rank 0's runner for the engine: the ModelRunner interface, each step broadcast to the workers."""

    def __init__(self, runner: TPModelRunner, processes: list[Any]) -> None:
        self.runner = runner
        self.processes = processes

    def __getattr__(self, name: str) -> Any:  # tokenizer, block_size, num_kv_blocks, ...
        return getattr(self.runner, name)

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        dist.broadcast_object_list([out], src=0)
        return self.runner.execute(out)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers (they leave their loop) and wait for them."""
        dist.broadcast_object_list([None], src=0)
        for p in self.processes:
            p.join(timeout)
        dist.destroy_process_group()


def worker_loop(runner: TPModelRunner) -> None:
    """Ranks 1..tp-1: run each step rank 0 broadcasts, until it broadcasts None."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        runner.execute(box[0])
