"""Decode attention on CPU: the native kernel (engine/csrc) against the torch gather + SDPA path, per layer.

    .venv/bin/python bench/cpu_attention.py            # SmolLM2's shape, fp32, the machine's threads

Each row is one layer's decode step of B sequences (KV write + attention), as the paged engine runs it:
the gather plan is built outside the timing (the runner builds it once per step for all layers). Both
outputs are compared first. KV GB/s = K and V bytes the step must read / the native kernel's time.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time

import torch
from gearshift.engine import cpu_kernels
from gearshift.engine.attention import build_plan, paged_attention_torch
from gearshift.engine.attention_metadata import AttentionMetadata
from gearshift.engine.config import usable_cpus

SCENARIOS = [  # (name, batch, context range)
    ("decode 1 x ctx 300", 1, (300, 300)),
    ("decode 8 x ctx 100-500", 8, (100, 500)),
    ("decode 32 x ctx 100-500", 32, (100, 500)),
    ("decode 64 x ctx 32-512", 64, (32, 512)),
    ("decode 64 x ctx 1024-2048", 64, (1024, 2048)),
]


def make_step(batch: int, lo: int, hi: int, heads: tuple[int, int, int], bs: int, seed: int):
    hq, hkv, d = heads
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    ctx = [rng.randint(lo, hi) for _ in range(batch)]
    need = [math.ceil(c / bs) for c in ctx]
    order = torch.randperm(sum(need) + 1, generator=gen).tolist()  # scattered blocks, like a busy cache
    tables, used = [], 0
    for n in need:
        tables.append(order[used : used + n] + [0] * (max(need) - n))
        used += n
    slots = [tables[i][(c - 1) // bs] * bs + (c - 1) % bs for i, c in enumerate(ctx)]
    meta = AttentionMetadata(torch.tensor(slots), torch.arange(batch + 1, dtype=torch.int32),
                             torch.tensor(ctx, dtype=torch.int32), torch.tensor(tables, dtype=torch.int32), 1, max(ctx))
    cache = (torch.randn(len(order), bs, hkv, d, generator=gen), torch.randn(len(order), bs, hkv, d, generator=gen))
    qkv = (torch.randn(batch, hq, d, generator=gen), torch.randn(batch, hkv, d, generator=gen),
           torch.randn(batch, hkv, d, generator=gen))
    return meta, cache, qkv, 2 * sum(ctx) * hkv * d * 4


def median_ms(fn, iters: int) -> float:
    fn()
    samples = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--heads", default="9,3,64", help="query heads, kv heads, head_dim (default SmolLM2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or usable_cpus())
    if cpu_kernels.kernels() is None:
        print("the native CPU kernel is unavailable here (see the warning above); nothing to compare")
        return 1
    heads = tuple(int(x) for x in args.heads.split(","))
    scale = heads[2] ** -0.5
    print(f"{torch.get_num_threads()} threads, fp32, heads {heads}, block size 16, median of {args.iters}\n")
    head = ["step", "torch ms", "native ms", "speedup", "KV GB/s", "max |diff|"]
    rows = []
    for i, (name, batch, (lo, hi)) in enumerate(SCENARIOS):
        meta, (kc, vc), (q, k, v), kv_bytes = make_step(batch, lo, hi, heads, 16, i)
        plans = {n: build_plan(meta, 16, q.device, native=n) for n in (False, True)}
        outs, ms = {}, {}
        with torch.inference_mode():
            for native, plan in plans.items():
                def step(plan=plan, q=q, k=k, v=v, kc=kc, vc=vc, meta=meta) -> torch.Tensor:
                    return paged_attention_torch(q, k, v, kc, vc, meta, scale, plan)

                outs[native] = step()
                ms[native] = median_ms(step, args.iters)
        diff = (outs[True] - outs[False]).abs().max().item()
        rows.append([name, f"{ms[False]:.3f}", f"{ms[True]:.3f}", f"{ms[False] / ms[True]:.2f}x",
                     f"{kv_bytes / ms[True] / 1e6:.1f}", f"{diff:.1e}"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
