"""Embeddings on the paged engine: prefill-only forwards of the inputs, run by the engine's own worker
thread between two steps, in KV blocks borrowed from the free pool and returned at once, so generation
keeps its blocks, its batch and its libgomp team.

Pooling: the final-normed hidden state of the last token (what the model feeds its LM head), L2-normalised
— the row llama.cpp's LAST pooling returns, so both engines embed alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gearshift.engine.errors import EngineOverloadedError


def embed_on_engine(engine: Any, inputs: list[list[int]]) -> np.ndarray:
    """Token id lists -> float32 [len(inputs), hidden], rows L2-normalised. Call on the engine's thread."""
    rows: list[np.ndarray] = []
    budget = max(int(getattr(engine.config, "max_num_batched_tokens", 0) or 0), 1)
    batch: list[list[int]] = []
    for ids in inputs:
        if batch and sum(map(len, batch)) + len(ids) > budget:
            rows.append(_forward(engine, batch))
            batch = []
        batch.append(ids)
    if batch:
        rows.append(_forward(engine, batch))
    out = np.concatenate(rows)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _forward(engine: Any, batch: list[list[int]]) -> np.ndarray:
    import torch
    from gearshift.engine.sampling_params import SamplingParams
    from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput
    from gearshift.engine.sequence import Sequence

    bm, runner = engine.block_manager, engine.runner
    counters = (bm.prefix_cache_queries, bm.prefix_cache_hits)  # embeddings are not prompts to the cache
    seqs = [Sequence(f"embed-{i}", ids, SamplingParams(max_tokens=1)) for i, ids in enumerate(batch)]
    taken: list[Any] = []
    try:
        for s in seqs:
            if not bm.allocate(s, s.num_tokens):
                raise EngineOverloadedError("no free KV blocks for this embedding batch now; retry shortly")
            taken.append(s)
        out = SchedulerOutput(seqs=[ScheduledSeq(s.seq_id, s.token_ids, 0, s.block_table, True) for s in seqs])
        input_ids, positions, meta, sample_rows = runner.prepare(out)
        with torch.inference_mode():
            hidden = runner.model(input_ids, positions, meta, runner.kv_caches)  # [T, D], final-normed
            last = hidden if sample_rows is None else hidden[sample_rows]  # [B, D]: each input's last token
            return last.float().cpu().numpy()
    finally:
        for s in taken:
            bm.free(s)
        bm.prefix_cache_queries, bm.prefix_cache_hits = counters
