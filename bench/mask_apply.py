"""The paged engine's grammar mask on a CPU, per step at batch 32 over the bundled vocabulary (49152 tokens):
engine/sampler.py's apply_bitmask (in place on the packed words) against the version it replaced (copy the
logits, unpack every word, one masked copy per row), on a sparse mask (a JSON number: 12 tokens allowed per
row, the usual case) and a dense one (inside a free string: most words all ones), timed in this run.

    .venv/bin/python bench/mask_apply.py [--batch 32] [--vocab 49152] [--iters 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from gearshift.engine.sampler import apply_bitmask


def unpack_and_copy(logits: torch.Tensor, rows: list[int], bitmask: np.ndarray) -> torch.Tensor:
    """The baseline: what apply_bitmask did on a CPU before (commit dca86b9)."""
    vocab = logits.shape[1]
    out = logits.float().numpy().copy()  # [B, V]
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")  # [G, W*32]
    width = min(allowed.shape[1], vocab)
    for j, r in enumerate(rows):
        np.copyto(out[r, :width], -np.inf, where=allowed[j, :width] == 0)
        out[r, width:] = -np.inf
    return torch.from_numpy(out)


def masks(batch: int, vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    words = (vocab + 31) // 32
    sparse = np.zeros((batch, words), dtype=np.uint32)
    for row in sparse:
        for t in rng.choice(vocab, 12, replace=False):
            row[t // 32] |= np.uint32(1 << (t % 32))
    dense = np.full((batch, words), 0xFFFFFFFF, dtype=np.uint32)
    dense[:, ::7] = rng.integers(0, 2**32, size=dense[:, ::7].shape, dtype=np.uint32)
    return {"sparse": sparse.view(np.int32), "dense": dense.view(np.int32)}


def per_call_ms(fn: Callable[[], object], iters: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    base = rng.standard_normal((args.batch, args.vocab), dtype=np.float32)  # [B, V] one step's logits
    rows = list(range(args.batch))
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f in
                    ("avx2", "avx512f", "avx512_bf16", "avx512_vnni")})
    print(f"cpu flags: {' '.join(flags)}; batch {args.batch}, vocab {args.vocab}; each call includes the copy "
          f"of fresh logits it masks ({base.nbytes / 2**20:.1f} MiB)")
    copy_ms = per_call_ms(lambda: torch.from_numpy(base.copy()), args.iters)
    print(f"{'mask':<7} {'before ms':>9} {'now ms':>7} {'now/before':>10}   (the copy alone: {copy_ms:.3f} ms)")
    for name, bitmask in masks(args.batch, args.vocab, rng).items():
        want = unpack_and_copy(torch.from_numpy(base.copy()), rows, bitmask)
        assert torch.equal(apply_bitmask(torch.from_numpy(base.copy()), rows, bitmask), want)
        before = per_call_ms(lambda b=bitmask: unpack_and_copy(torch.from_numpy(base.copy()), rows, b), args.iters)
        now = per_call_ms(lambda b=bitmask: apply_bitmask(torch.from_numpy(base.copy()), rows, b), args.iters)
        print(f"{name:<7} {before:>9.3f} {now:>7.3f} {now / before:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
