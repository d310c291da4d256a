"""Start a tensor-parallel engine: tp - 1 worker processes (spawned), this process as rank 0.

gloo on CPU (tests, and CPU serving), NCCL on GPUs (rank r on cuda:r). The rendezvous is a TCP port on
127.0.0.1: all ranks of one replica run in one pod.
"""

from __future__ import annotations

import socket
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gearshift.engine.config import EngineConfig
from gearshift.engine.distributed.runner import TPExecutor, TPModelRunner, worker_loop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(config: EngineConfig) -> str:
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def _init(rank: int, tp: int, init_method: str, backend: str) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=tp)


def worker_main(config: EngineConfig, rank: int, tp: int, init_method: str, backend: str) -> None:
    _init(rank, tp, init_method, backend)
    try:
        worker_loop(TPModelRunner(config, rank, tp))
    finally:
        dist.destroy_process_group()


def start(config: EngineConfig, tp: int) -> TPExecutor:
    """Spawn ranks 1..tp-1, become rank 0, build every shard; returns rank 0's executor for LLMEngine."""
    backend = _backend(config)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    procs: list[Any] = [ctx.Process(target=worker_main, args=(config, r, tp, init_method, backend), daemon=True)
                        for r in range(1, tp)]
    for p in procs:
        p.start()
    _init(0, tp, init_method, backend)
    return TPExecutor(TPModelRunner(config, 0, tp), procs)
