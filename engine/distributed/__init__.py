"""Tensor parallelism for the paged engine: one process per device, the model sharded the Megatron way.

    sharding.py   pure: each rank's ModelConfig and its slice of every checkpoint tensor
    collectives.py  the all-reduce after each attention and MLP block, vocab-parallel embedding and head
    runner.py     TPModelRunner (a ModelRunner over the local shard) and the rank-0 executor / worker loop
    launch.py     start the worker processes (gloo on CPU, NCCL on GPUs) and hand rank 0 its executor
"""
