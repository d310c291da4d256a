"""A decode step over scattered KV-cache blocks, for the CPU attention tests (test_attention.py: the fp32
native kernel against the gathered torch path; test_cpu_kernels.py: the bf16 kernels)."""

from __future__ import annotations

import torch
from gearshift.engine.attention_metadata import AttentionMetadata


def scattered_decodes(ctx: list[int], bs: int, gen: torch.Generator) -> tuple[AttentionMetadata, list[list[int]], int]:
    """Decodes of the given context lengths, each followed by a 2-token prefill chunk of a fresh sequence (so
    decode rows are 0, 3, 6, ...: not contiguous), every sequence's blocks a random permutation of the cache.
    Returns the step's metadata, each decode's block table and the number of cache blocks it needs."""
    need = [-(-c // bs) for c in ctx]
    order = torch.randperm(sum(need) + len(ctx), generator=gen).tolist()
    tables, used = [], 0
    for n in need:
        tables.append(order[used : used + n] + [0] * (max(need) - n))
        used += n
    fresh = [order[used + i] for i in range(len(ctx))]  # one spare block per prefill chunk
    all_tables = [t for pair in zip(tables, ([f] + [0] * (max(need) - 1) for f in fresh), strict=True) for t in pair]
    qsl = [0]
    for _ in ctx:
        qsl += [qsl[-1] + 1, qsl[-1] + 3]
    lens = [x for c in ctx for x in (c, 2)]
    slots = [x for i, c in enumerate(ctx) for x in (tables[i][(c - 1) // bs] * bs + (c - 1) % bs,
                                                     fresh[i] * bs, fresh[i] * bs + 1)]
    meta = AttentionMetadata(torch.tensor(slots), torch.tensor(qsl, dtype=torch.int32),
                             torch.tensor(lens, dtype=torch.int32), torch.tensor(all_tables, dtype=torch.int32),
                             2, max(lens))
    return meta, tables, len(order)
