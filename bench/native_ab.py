"""One decode step of the paged engine on CPU with the native kernels (engine/csrc) on and off, interleaved.

    nice -n -5 .venv/bin/python bench/native_ab.py --quantization int4 --rows 1
    nice -n -5 .venv/bin/python bench/native_ab.py --rows 1,32            # dtype auto (bf16 with avx512_bf16)

Loads the runner once (bundled SmolLM2-135M unless --model), prefills M sequences of 128 tokens, then times
`runner.execute` of one decode step of all M, alternating native on / off step by step so a busy VM's drift
lands on both. "off" is the torch path, the one bf16 took before the kernels had bf16 variants. Prints the
CPU flags, ms per step (lower quartile) and off/on, and the largest logit difference between the two.
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
    ap.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rows", default="1", help="decode batch sizes M, comma separated")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per M and path")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    import torch
    from gearshift.engine import cpu_kernels
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model_runner import ModelRunner
    from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput

    rows = [int(x) for x in args.rows.split(",")]
    native = cpu_kernels.kernels()
    assert native is not None, "the native CPU kernels did not build (see the log)"
    runner = ModelRunner(EngineConfig(model=args.model or str(bundled_model_path()), device="cpu",
                                      dtype=args.dtype, quantization=args.quantization,
                                      max_num_seqs=max(rows), kv_cache_memory="512Mi"))
    if args.threads:  # after the runner, which sets the engine's own thread count
        torch.set_num_threads(args.threads)
    ctx, dtype = 128, runner.model.embed_tokens.weight.dtype
    per_seq = -(-(ctx + 1) // runner.block_size)
    prompt = list(range(300, 300 + ctx))
    print(f"CPU flags: {_flags()}; threads {torch.get_num_threads()}; dtype {dtype}, quantization "
          f"{args.quantization}; context {ctx}; ms per decode step (lower quartile of {args.steps})")
    print("| M | native ms | torch ops ms | torch / native | max logit diff |")
    print("|---:|---:|---:|---:|---:|")
    for m in rows:
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(m)]
        runner.execute(SchedulerOutput(seqs=[ScheduledSeq(i, prompt, 0, tables[i], True) for i in range(m)]))
        step = SchedulerOutput(seqs=[ScheduledSeq(i, [1], ctx, tables[i], True) for i in range(m)])
        times: dict[bool, list[float]] = {True: [], False: []}
        logits = {}
        for i in range(args.steps + 3):
            for on in (True, False):
                cpu_kernels._cache["module"] = native if on else None  # no reload: the same module object
                t = time.perf_counter()
                logits[on] = runner.execute(step)
                if i >= 3:
                    times[on].append(time.perf_counter() - t)
        cpu_kernels._cache["module"] = native
        a, b = (sorted(times[on])[len(times[on]) // 4] * 1e3 for on in (True, False))
        diff = (logits[True].float() - logits[False].float()).abs().max().item()
        print(f"| {m} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {diff:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
