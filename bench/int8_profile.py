"""Where a quantized paged engine's CPU step time goes at 32 streams: torch.profiler over the runner's own
forward + LM head, grouped by matmul (q/k/v, o, gate/up, down, LM head) and the rest.

    .venv/bin/python bench/int8_profile.py --quantization int8 --threads 2

Two step shapes, the ones a 32-stream closed loop with 128-token prompts runs: a pure decode step of 32
rows (context ~190 each), and a mixed step of 31 decodes plus one 128-token prefill chunk (a new request
joining). Prints the CPU flags, then per step shape: ms per step and each group's share.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

GROUPS = {  # output features -> name, for SmolLM2-135M-shaped matmuls (K, N) read from the op's shapes
    960: "q/k/v", 576: "o or down", 3072: "gate/up", 49152: "LM head",
}


def cpu_flags() -> str:
    with open("/proc/cpuinfo") as f:
        flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    return " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_int8") if x in flags)


def step(n_dec: int, prefill: int, ctx: int, block_size: int):
    """A SchedulerOutput: n_dec decodes at context ctx, then one prefill chunk of `prefill` tokens."""
    from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput

    blocks_per = -(-(ctx + prefill + 1) // block_size)
    seqs, nxt = [], 0
    for i in range(n_dec):
        seqs.append(ScheduledSeq(i, [100 + i], ctx, list(range(nxt, nxt + blocks_per)), True))
        nxt += blocks_per
    if prefill:
        seqs.append(ScheduledSeq(n_dec, [200 + (j % 50) for j in range(prefill)], 0,
                                 list(range(nxt, nxt + blocks_per)), True))
    return SchedulerOutput(seqs=seqs, num_decodes=n_dec)


def run_step(runner, out) -> None:
    input_ids, positions, meta, rows = runner.prepare(out)
    hidden = runner.model(input_ids, positions, meta, runner.kv_caches)
    runner.model.compute_logits(hidden if rows is None else hidden[rows])


def interleaved_ms(runners: dict, out, rounds: int) -> dict[str, list[float]]:
    """{name: [ms of each timed step]}: one warm-up step each, then `rounds` passes running every runner's
    step in turn, so a busy machine's drift lands on all of them alike; every other pass in reverse order, so
    no runner always follows the same one (measured: of two int8 runners with the same one-row path, the
    one run second read ~3% slower)."""
    import torch

    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.inference_mode():
        for r in runners.values():
            run_step(r, out)
        for i in range(rounds):
            for k, r in (runners.items() if i % 2 == 0 else reversed(runners.items())):
                t0 = time.perf_counter()
                run_step(r, out)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def classify(name: str, shapes: list) -> str:
    if "linear_dynamic" in name or "linear_pointwise" in name or name in ("aten::addmm", "aten::mm"):
        int8 = "dynamic" in name or "qlinear" in name  # FBGEMM's dynamic linear, oneDNN's (per-token path)
        kind = "int8" if int8 else "dense"
        try:
            k, n = shapes[0][-1], (shapes[1][0] if not int8 else None)
        except (IndexError, TypeError):
            k, n = None, None
        if k == 1536:
            return f"down_proj ({kind})"
        return f"matmul K={k} ({kind})" if n is None else f"matmul {k}x{n} ({kind})"
    if "quantize" in name or "int8" in name or "int4" in name:
        return name
    if "attention" in name or "paged" in name:
        return "attention"
    return "other: " + name


def profile(runner, out, reps: int) -> tuple[float, dict[str, float]]:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with torch.inference_mode():
        for _ in range(2):
            run_step(runner, out)
        t0 = time.perf_counter()
        for _ in range(reps):
            run_step(runner, out)
        wall = (time.perf_counter() - t0) / reps * 1e3
        with tprofile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(reps):
                run_step(runner, out)
    groups: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages(group_by_input_shape=True):
        groups[classify(ev.key, ev.input_shapes)] += ev.self_cpu_time_total / 1e3 / reps
    return wall, groups


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantization", default="int8")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args(argv)
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model_runner import ModelRunner

    runner = ModelRunner(EngineConfig(model=args.model or str(bundled_model_path()), dtype=args.dtype,
                                      device="cpu", quantization=args.quantization, threads=args.threads,
                                      max_model_len=1024, kv_cache_memory=512 << 20, max_num_seqs=64))
    print(f"CPU flags: {cpu_flags()}; quantization {args.quantization}, {args.threads} threads")
    for label, out in (("decode 32 rows, ctx 190", step(32, 0, 190, runner.block_size)),
                       ("31 decodes + 128-token prefill", step(31, 128, 190, runner.block_size))):
        wall, groups = profile(runner, out, args.reps)
        total = sum(groups.values())
        print(f"\n{label}: {wall:.2f} ms a step (wall), profiled self CPU {total:.2f} ms")
        print("| op group | ms/step | share |\n|---|---:|---:|")
        for name, ms in sorted(groups.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"| {name} | {ms:.2f} | {100 * ms / total:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
