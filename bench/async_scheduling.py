"""Async scheduling on vs off: one process, the same greedy workload, runs interleaved off on on off off on...

    nice -n -5 .venv/bin/python bench/async_scheduling.py              # CPU, bundled SmolLM2, fp32
    python3 bench/async_scheduling.py --device cuda --model /tmp/l8b --dtype bfloat16 --requests 64

Both engines are built first, warmed up once each, then run `--rounds` times each in ABBA order (so a
drifting load hits both alike). Prints each run's wall time and the engine thread's CPU time, the medians,
the on/off throughput ratio, and whether the token ids were equal (they must be). On a CPU nothing
overlaps (the forward is synchronous), so a ratio near 1 is the expected result; the figure that matters
is CUDA's (bench/gpu_check.sh's async_8b step runs bench/offline.py --compare-async for it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from gearshift.engine.thread_wait import apply_thread_wait, default_policy

apply_thread_wait(default_policy())  # before torch loads libgomp

from gearshift.engine import LLM, SamplingParams  # noqa: E402
from gearshift.engine.benchmark import make_workload  # noqa: E402
from gearshift.engine.bundled import bundled_model_path  # noqa: E402


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return "?"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni") if f in flags)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or HF directory (default: bundled SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each mode (ABBA order)")
    ap.add_argument("--kv-cache-memory", default="256Mi")
    args = ap.parse_args(argv)
    model = args.model or str(bundled_model_path())
    llms = {mode: LLM(model=model, device=args.device, dtype=args.dtype, async_scheduling=mode, max_model_len=1024,
                      kv_cache_memory=args.kv_cache_memory, max_num_seqs=max(args.requests, 1))
            for mode in ("off", "on")}
    work = make_workload(llms["off"].llm_engine.runner.vocab_size, args.requests, (args.prompt_len,) * 2,
                         (args.output_len,) * 2, seed=0)
    prompts = [{"prompt_token_ids": p} for p, _ in work.requests]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in work.requests]

    def run(mode: str) -> tuple[float, float, list[list[int]]]:
        t, c = time.perf_counter(), time.thread_time()
        outs = llms[mode].generate(prompts, params)
        return time.perf_counter() - t, time.thread_time() - c, [o.token_ids for o in outs]

    run("off"), run("on")  # warm-up
    order = [m for i in range(args.rounds) for m in (("off", "on") if i % 2 == 0 else ("on", "off"))]
    runs: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    tokens: dict[str, list[list[int]]] = {}
    for mode in order:
        wall, cpu, tokens[mode] = run(mode)
        runs[mode].append((wall, cpu))
    print(f"device {args.device}, model {model}, {args.dtype}, {args.requests} greedy requests x {args.output_len} "
          f"tokens, order {' '.join(order)}; cpu flags: {cpu_flags()}")
    for mode in ("off", "on"):
        print(f"  async {mode}: wall s {[round(w, 2) for w, _ in runs[mode]]}, engine thread CPU s "
              f"{[round(c, 2) for _, c in runs[mode]]}")
    off, on = (statistics.median(w for w, _ in runs[m]) for m in ("off", "on"))
    print(f"median wall: off {off:.2f} s, on {on:.2f} s; async on/off throughput {off / on:.3f}x; "
          f"steps launched ahead {llms['on'].llm_engine.num_async_steps}; tokens equal: {tokens['on'] == tokens['off']}")
    return 0 if tokens["on"] == tokens["off"] else 1


if __name__ == "__main__":
    sys.exit(main())
