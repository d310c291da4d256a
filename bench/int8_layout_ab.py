"""`--quantization int8` with one int8 layout per matrix where that is enough, and a 16-bit embedding table,
against the layouts before (2026-12-01 up to commit c77756e): two runners in one process, steps interleaved.

    nice -n -5 .venv/bin/python bench/int8_layout_ab.py --threads 2 --rounds 10

"before": every int8 matrix kept oneDNN's packed layout, and a plain int8 copy for torch._int_mm on steps of
one row (gate/up, down) or up to 64 rows (q/k/v, o); the embedding table fp32. "after": q/k/v and o keep the
plain layout only (torch._int_mm at every step size), gate/up and down both, the LM head the packed one only
(quant_int8.plain_rows_for); the table fp16 (llama._narrow_embedding). Prints the CPU flags, the bytes each
runner's int8 weights and embedding table hold, and per step ms (median / fastest) and before's over after's
(> 1: after is faster); first the q/k/v and o matmuls alone at the step sizes where their layout changed.
"""

from __future__ import annotations

import argparse
import statistics
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from int8_kernels_ab import prefill_step  # noqa: E402
from int8_profile import cpu_flags, interleaved_ms, step  # noqa: E402


def old_plain_rows(n: int, k: int, _int8_dot: bool = True) -> int:
    """The layout choice before: both layouts for every matrix up to GEMV_PLAIN_MAX weights (VNNI or not)."""
    from gearshift.engine.model import quant_int8

    if n * k > quant_int8.GEMV_PLAIN_MAX:
        return 0
    return 64 if max(n, k) <= 1024 else 1


def before_runner(cfg):
    """A runner built with the layouts and table of before (the choices swapped while it loads)."""
    from gearshift.engine.model import quant_int8
    from gearshift.engine.model.llama import LlamaForCausalLM
    from gearshift.engine.model_runner import ModelRunner

    new_rows, new_narrow = quant_int8.plain_rows_for, LlamaForCausalLM._narrow_embedding
    quant_int8.plain_rows_for, LlamaForCausalLM._narrow_embedding = old_plain_rows, lambda self: None
    try:
        return ModelRunner(cfg)
    finally:
        quant_int8.plain_rows_for, LlamaForCausalLM._narrow_embedding = new_rows, new_narrow


def held_mib(runner) -> tuple[float, float]:
    """(MiB of int8 weight layouts, MiB of the embedding table) a runner's model holds."""
    from gearshift.engine.model.layers import Linear
    from gearshift.engine.model.quant_int8 import Int8PerTokenWeight

    int8 = 0
    for m in runner.model.modules():
        if isinstance(m, Linear) and isinstance(m.small, Int8PerTokenWeight):
            n, k = m.small.out_features, m.small.in_features
            int8 += n * k * ((m.small.packed is not None) + (m.small.qt is not None))
    emb = runner.model.embed_tokens.weight
    return int8 / 2**20, emb.numel() * emb.element_size() / 2**20


def matmul_ab(threads: int, reps: int) -> None:
    """q/k/v's and o's int8 matmul alone (quantize, GEMM, scale), before's weight against after's, interleaved, at
    the step sizes where they differ (over 64 rows: before oneDNN's packed layout, after torch._int_mm)."""
    import time

    import torch
    from gearshift.engine.model import quant_int8

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    print("| matmul (N x K) | rows | before us | after us | before / after |")
    print("|---|---:|---:|---:|---:|")
    for n, k, label in ((960, 576, "q/k/v"), (576, 576, "o")):
        w = torch.randn(n, k, generator=g)
        new_rows, quant_int8.plain_rows_for = quant_int8.plain_rows_for, old_plain_rows
        try:
            before = quant_int8.Int8PerTokenWeight(w)
        finally:
            quant_int8.plain_rows_for = new_rows
        after = quant_int8.Int8PerTokenWeight(w)
        for m in (65, 128, 512, 2048):
            x = torch.randn(m, k, generator=g)
            ts: dict[str, list[float]] = {"before": [], "after": []}
            for i in range(reps):  # alternating which goes first (int8_profile.interleaved_ms says why)
                for name, q in (("before", before), ("after", after))[:: 1 if i % 2 == 0 else -1]:
                    t0 = time.perf_counter()
                    q.matmul(x)
                    ts[name].append((time.perf_counter() - t0) * 1e6)
            med = {name: statistics.median(v) for name, v in ts.items()}
            print(f"| {label} ({n} x {k}) | {m} | {med['before']:.0f} | {med['after']:.0f} "
                  f"| {med['before'] / med['after']:.3f}x |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--matmul-reps", type=int, default=200, help="interleaved calls per matmul size (0: skip)")
    args = ap.parse_args(argv)
    if args.matmul_reps:
        matmul_ab(args.threads, args.matmul_reps)
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model_runner import ModelRunner

    cfg = EngineConfig(model=args.model or str(bundled_model_path()), device="cpu", quantization="int8",
                       threads=args.threads, max_model_len=1024, kv_cache_memory=512 << 20, max_num_seqs=64)
    rs = {"before": before_runner(cfg), "after": ModelRunner(cfg)}
    bs = rs["after"].block_size
    print(f"CPU flags: {cpu_flags()}; {args.threads} threads; {args.rounds} interleaved steps each, "
          "ms as median / fastest (the fastest is the less disturbed on a shared machine)")
    for name, r in rs.items():
        int8, emb = held_mib(r)
        print(f"{name}: int8 weight layouts {int8:.1f} MiB, embedding table {emb:.1f} MiB "
              f"({r.model.embed_tokens.weight.dtype})")
    print("| step | before ms | after ms | before / after |")
    print("|---|---:|---:|---:|")
    for label, out in (("decode 1 row, ctx 190", step(1, 0, 190, bs)),
                       ("decode 32 rows, ctx 190", step(32, 0, 190, bs)),
                       ("decode 31 rows + 128-token prefill chunk", step(31, 128, 190, bs)),
                       ("prefill 1 x 128 tokens", prefill_step(1, 128, bs)),
                       ("prefill 16 x 128 tokens", prefill_step(16, 128, bs))):
        times = interleaved_ms(rs, out, args.rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        print(f"| {label} | {med['before']:.2f} / {best['before']:.2f} | {med['after']:.2f} / {best['after']:.2f} "
              f"| {med['before'] / med['after']:.3f}x / {best['before'] / best['after']:.3f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
