"""Attention per layer-step on one GPU: what the engine runs (Triton, flash SDPA) against the torch path.

    .venv/bin/python bench/kernels.py                 # needs CUDA; on CPU it says so and exits 0
    .venv/bin/python bench/kernels.py --dtype float16 --iters 50
    TRITON_INTERPRET=1 .venv/bin/python bench/kernels.py --smoke   # tiny shapes: checks the script only

Each row is one attention layer's step, "store this step's K/V into the cache, then attend":
  - torch: `gearshift.engine.attention.paged_attention_torch` (index_copy_ + gathered SDPA; a prefill with
    no cached prefix is one causal SDPA over its own keys: flash on CUDA), its gather plan built outside the
    timing (the runner builds it once per step for all layers);
  - engine: what the engine runs on CUDA, `gearshift.engine.kernels.attention_step`: the Triton K/V store,
    then prefills of >= 1024 new tokens with no cached prefix by flash SDPA and everything else by the
    Triton kernels (split-KV for pure decode, else the unified kernel); its route (kernels.plan_route)
    built outside the timing too. "route" says which: dense, paged, or both in one step.
Rows marked "unified only" run the same step with no route (all through the unified kernel): the kernel
the long prefills used before, kept so the change stays visible. Both outputs are checked against each
other first. Times are medians over --iters runs (CUDA events). KV GB/s = bytes of K and V the step must
read from the cache / the engine's time (compare with the HBM peak).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from gearshift.engine.attention import build_plan, paged_attention_torch
from gearshift.engine.attention_metadata import AttentionMetadata

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MODELS = {  # name: (query heads, kv heads, head_dim)
    "SmolLM2-135M": (9, 3, 64),
    "Llama-3-8B": (32, 8, 128),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    seqs: tuple[tuple[int, int], ...]  # (new tokens this step, context after the step)
    paged_only: bool = False  # no prefill route: every sequence through the paged kernels
    dense_min: int | None = None  # the route's threshold (None: the engine's DENSE_MIN_QUERY_LEN)


def scenarios(smoke: bool) -> list[Scenario]:
    if smoke:
        return [Scenario("decode 4 x ctx 40", ((1, 40),) * 4), Scenario("mixed", ((1, 20), (9, 30))),
                Scenario("prefill 24 + decode (dense from 16)", ((24, 24), (1, 30)), dense_min=16)]
    rng = random.Random(0)
    return [
        Scenario("decode 1 x ctx 4096", ((1, 4096),)),
        Scenario("decode 16 x ctx 1024", ((1, 1024),) * 16),
        Scenario("decode 64 x ctx 128-2048", tuple((1, rng.randint(128, 2048)) for _ in range(64))),
        Scenario("decode 256 x ctx 512", ((1, 512),) * 256),
        Scenario("prefill 4 x 512", ((512, 512),) * 4),
        Scenario("prefill 1 x 4096", ((4096, 4096),)),
        Scenario("prefill 1 x 4096, unified only", ((4096, 4096),), paged_only=True),
        Scenario("prefill 2 x 1024", ((1024, 1024),) * 2),
        Scenario("prefill 2 x 1024, unified only", ((1024, 1024),) * 2, paged_only=True),
        Scenario("chunk 2048 after 2048 cached", ((2048, 4096),)),
        Scenario("prefix hit 4 x 128 of 2048", ((128, 2048),) * 4),
        Scenario(
            "mixed 32 decodes + 512 chunk",
            tuple((1, rng.randint(256, 2048)) for _ in range(32)) + ((512, 1024),),
        ),
        Scenario("mixed 32 decodes + 2048 prompt", tuple((1, rng.randint(256, 2048)) for _ in range(32))
                 + ((2048, 2048),)),
    ]


@dataclass
class Step:
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D] this step's keys
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    meta: AttentionMetadata
    kv_bytes: int  # K and V bytes the step reads from the cache


def make_step(
    s: Scenario, heads: tuple[int, int, int], block_size: int, dtype: torch.dtype, dev: str
) -> Step:
    hq, hkv, d = heads
    gen = torch.Generator().manual_seed(0)
    needed = [math.ceil(ctx / block_size) for _, ctx in s.seqs]
    num_blocks = sum(needed) + 1
    order = torch.randperm(num_blocks, generator=gen).tolist()  # scattered blocks, like a busy cache
    tables, slots, qsl, used = [], [], [0], 0
    for (q_len, ctx), n in zip(s.seqs, needed, strict=True):
        table = order[used : used + n]
        used += n
        tables.append(table + [0] * (max(needed) - n))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx - q_len, ctx)]
        qsl.append(qsl[-1] + q_len)
    t = qsl[-1]
    shape = (num_blocks, block_size, hkv, d)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([ctx for _, ctx in s.seqs], dtype=torch.int32, device=dev),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
        max_query_len=max(q for q, _ in s.seqs),
        max_seq_len=max(ctx for _, ctx in s.seqs),
        query_start_loc_host=qsl,  # what kernels.plan_route reads (as ModelRunner.prepare fills it)
        seq_lens_host=[ctx for _, ctx in s.seqs],
    )

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen).to(dtype).to(dev)

    kv_bytes = 2 * sum(ctx for _, ctx in s.seqs) * hkv * d * torch.finfo(dtype).bits // 8
    return Step(rand(t, hq, d), rand(t, hkv, d), rand(t, hkv, d), rand(*shape), rand(*shape), meta, kv_bytes)


def time_ms(fn: Callable[[], object], iters: int, dev: str) -> float:
    for _ in range(3):  # warm-up: Triton compiles, cuBLAS/SDPA pick kernels
        fn()
    samples = []
    for _ in range(iters):
        if dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def run_row(model: str, s: Scenario, args: argparse.Namespace, dev: str) -> list[str]:
    from gearshift.engine import kernels
    from gearshift.engine.kernels.prefill_route import DENSE_MIN_QUERY_LEN

    heads = MODELS[model]
    dtype = DTYPES[args.dtype]
    step = make_step(s, heads, args.block_size, dtype, dev)
    scale = heads[2] ** -0.5
    plan = build_plan(step.meta, args.block_size, torch.device(dev))
    route = None if s.paged_only else kernels.plan_route(step.meta, None, dtype, heads[2], None,
                                                         s.dense_min or DENSE_MIN_QUERY_LEN)
    caches_torch = (step.k_cache.clone(), step.v_cache.clone())

    def torch_path() -> torch.Tensor:
        return paged_attention_torch(step.q, step.k, step.v, *caches_torch, step.meta, scale, plan)

    def engine_path() -> torch.Tensor:
        return kernels.attention_step(step.q, step.k, step.v, step.k_cache, step.v_cache, step.meta, scale, route)

    with torch.inference_mode():
        diff = (torch_path().float() - engine_path().float()).abs().max().item()
        torch_ms = time_ms(torch_path, args.iters, dev)
        engine_ms = time_ms(engine_path, args.iters, dev)
    tokens = step.q.shape[0]
    gbs = step.kv_bytes / (engine_ms * 1e-3) / 1e9
    kind = "paged" if route is None else "dense" if route.seq_skip is None else "dense+paged"
    return [
        model,
        s.name,
        str(tokens),
        kind,
        f"{torch_ms:.3f}",
        f"{engine_ms:.3f}",
        f"{torch_ms / engine_ms:.2f}x",
        f"{gbs:.0f}",
        f"{diff:.1e}",
    ]


def format_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The engine's GPU attention vs the torch path, per layer-step.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--block-size", type=int, default=16, choices=(16, 32))
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--model", choices=sorted(MODELS), action="append", help="repeatable; default: all")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 iteration: checks the script")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        dev = "cuda"
    elif args.smoke:
        dev = "cpu"  # Triton's interpreter: needs TRITON_INTERPRET=1 in the environment
        args.iters = 1
    else:
        print(
            "bench/kernels.py needs a CUDA GPU: the Triton kernels only run under the interpreter on CPU "
            "(tests); nothing to measure here."
        )
        return 0
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter, smoke only)"
    print(f"device: {gpu}; dtype {args.dtype}; block size {args.block_size}; median of {args.iters}\n")
    head = ["model", "step", "tokens", "route", "torch ms", "engine ms", "speedup", "KV GB/s", "max |diff|"]
    rows = []
    for model in args.model or list(MODELS):
        for s in scenarios(args.smoke):
            rows.append(run_row(model, s, args, dev))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)  # progress
    print(format_table(head, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
