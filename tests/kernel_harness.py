"""What the Triton kernel tests share (test_kernels.py, test_prefill_route.py): the switch to Triton's
interpreter, a plain torch reference of paged attention, and a step's random caches, queries and
block tables built from a Case.

Triton's interpreter (TRITON_INTERPRET=1) must be on before triton's first import in the process: importing
this module switches it on when the machine has no GPU and nothing imported triton yet (the engine's
kernel package loads triton only when a kernel runs). Where it cannot (a GPU machine, or triton imported
earlier), test_kernels.py re-runs the CPU cases in a fresh interpreting pytest process.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from gearshift.engine.attention_metadata import AttentionMetadata  # noqa: E402
from gearshift.engine.kernels.loader import interpreter_active  # noqa: E402

INTERPRETING = interpreter_active()
cpu_in_process = pytest.mark.skipif(
    not INTERPRETING,
    reason="triton is not interpreting here: test_cpu_cases_in_an_interpreting_process runs it",
)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
TOLERANCE = {torch.float32: 2e-4, torch.float16: 1.5e-2, torch.bfloat16: 3e-2}


# ----------------------------------------------------------------------------------------------------------
# The reference: obviously correct, one sequence at a time, all in fp32.


def ref_paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: torch.Tensor,  # [B, max_blocks]
    scale: float,
) -> torch.Tensor:
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // num_kv_heads
    outputs, start = [], 0
    for i, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        qi = q[start : start + q_len].float() * scale  # [q_len, Hq, D]
        start += q_len
        blocks = block_tables[i, : math.ceil(seq_len / block_size)].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()  # [seq_len, Hkv, D]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k = torch.repeat_interleave(k, group, dim=1)  # [seq_len, Hq, D]
        v = torch.repeat_interleave(v, group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qi, k)
        # Query j sits at position seq_len - q_len + j and sees keys up to it.
        future = torch.triu(torch.ones(q_len, seq_len, dtype=torch.bool), diagonal=seq_len - q_len + 1)
        scores.masked_fill_(future, float("-inf"))
        outputs.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v))
    return torch.cat(outputs)


# ----------------------------------------------------------------------------------------------------------
# Test cases: a step's sequences as (query_len, seq_len) pairs plus the model/cache shapes.


@dataclass(frozen=True)
class Case:
    seqs: tuple[tuple[int, int], ...]  # (new tokens this step, context length after the step)
    heads: tuple[int, int]  # (Hq, Hkv)
    head_dim: int = 64
    block_size: int = 16
    dtype: torch.dtype = torch.float32
    splits: int | None = None  # decode path: forced number of KV splits

    def __str__(self) -> str:
        kind = "decode" if max(q for q, _ in self.seqs) == 1 else "varlen"
        dt = str(self.dtype).removeprefix("torch.")
        return f"{kind}-{len(self.seqs)}seq-h{self.heads[0]}x{self.heads[1]}-d{self.head_dim}-b{self.block_size}-{dt}"


@dataclass
class Step:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata
    query_lens: list[int]
    seq_lens: list[int]
    scale: float


def make_step(case: Case, device: str, seed: int = 0) -> Step:
    """Random caches and queries; each sequence gets scattered (shuffled) blocks; block tables are
    padded with extra zero columns as the engine pads them."""
    gen = torch.Generator().manual_seed(seed)
    num_q_heads, num_kv_heads = case.heads
    bs = case.block_size
    query_lens = [q for q, _ in case.seqs]
    seq_lens = [s for _, s in case.seqs]
    needed = [math.ceil(s / bs) for s in seq_lens]
    num_blocks = sum(needed) + 3  # spare blocks hold random junk the kernels must never read
    order = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(seq_lens), max(needed, default=0) + 2, dtype=torch.int32)
    used = 0
    for i, n in enumerate(needed):
        block_tables[i, :n] = order[used : used + n]
        used += n
    slots = []
    for i, (q_len, s_len) in enumerate(case.seqs):
        for pos in range(s_len - q_len, s_len):
            slots.append(int(block_tables[i, pos // bs]) * bs + pos % bs)
    cache_shape = (num_blocks, bs, num_kv_heads, case.head_dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(case.dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(case.dtype)
    q = torch.randn(sum(query_lens), num_q_heads, case.head_dim, generator=gen).to(case.dtype)
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_host=starts,
        seq_lens_host=seq_lens,
    )
    return Step(
        q=q.to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        meta=meta,
        query_lens=query_lens,
        seq_lens=seq_lens,
        scale=case.head_dim**-0.5,
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)


def _params(cpu: list[Case], gpu: list[Case]) -> list:
    return [pytest.param(c, "cpu", id=f"cpu-{c}", marks=cpu_in_process) for c in cpu] + [
        pytest.param(c, "cuda", id=f"cuda-{c}", marks=pytest.mark.gpu) for c in gpu
    ]
