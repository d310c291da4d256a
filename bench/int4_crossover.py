"""Where the int4 kernel stops paying: one decode step of M sequences, int4 weights vs the dense path.

    nice -n -5 .venv/bin/python bench/int4_crossover.py            # bundled SmolLM2-135M, M = 1..32

Loads the paged engine's runner once with `--quantization int4` and times `runner.execute` on M decode
rows (each sequence 128 tokens into its context) with every matmul forced onto its small-step weight
(4-bit blocks, the LM head per-row int8) and then forced onto the dense pre-packed bf16 weights, the two
interleaved step by step so the VM's drift lands on both. The whole model is used, so weights stream
from memory as they do when serving (a single-matrix microbenchmark keeps them in cache and flatters
bf16). Prints ms per step (lower quartile) and dense/int4; INT4_MAX_ROWS in engine/model/quant_int4.py
is the largest M where int4 wins.
"""

from __future__ import annotations

import argparse
import sys
import time


def _flags() -> str:
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "").split()
    return " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if x in flags)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or HF directory (default: bundled SmolLM2)")
    ap.add_argument("--rows", default="1,2,4,8,16,32", help="decode batch sizes M")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per M and path")
    args = ap.parse_args(argv)
    import torch
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model.layers import Linear
    from gearshift.engine.model_runner import ModelRunner
    from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput

    rows = [int(x) for x in args.rows.split(",")]
    ctx = 128
    runner = ModelRunner(EngineConfig(model=args.model or str(bundled_model_path()), device="cpu",
                                      quantization="int4", max_num_seqs=max(rows), kv_cache_memory="256Mi"))
    linears = [m for m in runner.model.modules() if isinstance(m, Linear) and m.small is not None]
    per_seq = -(-(ctx + 1) // runner.block_size)

    def step(m: int) -> SchedulerOutput:
        return SchedulerOutput(seqs=[ScheduledSeq(i, [1], ctx, list(range(i * per_seq, (i + 1) * per_seq)), True)
                                     for i in range(m)])

    def timed(out: SchedulerOutput, limit: int) -> float:
        for lin in linears:
            lin.small_max_rows = limit
        t = time.perf_counter()
        runner.execute(out)
        return time.perf_counter() - t

    print(f"CPU flags: {_flags()}; threads {torch.get_num_threads()}; ms per decode step (lower quartile)")
    print("| M | int4 ms | dense bf16 ms | dense / int4 |")
    print("|---:|---:|---:|---:|")
    for m in rows:
        out = step(m)
        a, b = [], []
        for i in range(args.steps + 3):
            ta, tb = timed(out, 1 << 30), timed(out, 0)
            if i >= 3:
                a.append(ta), b.append(tb)
        qa, qb = sorted(a)[len(a) // 4] * 1e3, sorted(b)[len(b) // 4] * 1e3
        print(f"| {m} | {qa:.2f} | {qb:.2f} | {qb / qa:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
