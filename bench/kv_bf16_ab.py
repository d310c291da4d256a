"""`--quantization int8`'s KV cache in bf16 (the default on CPUs with avx512_bf16) against fp32 (the default
before, and still elsewhere), both in ONE process: one int8 runner, two KV caches swapped step by step, so the
weights, the kernels and a busy VM's drift are the same for both.

    nice -n -5 .venv/bin/python bench/kv_bf16_ab.py [--threads 2] [--reps 15]

Part 1, speed: whole decode steps of the bundled SmolLM2-135M (bench/int8_profile.py's step: 32 rows, and 1,
at context 190), interleaved call by call: ms/step (lower quartile) and fp32/bf16. At 32 rows x 190 the
step's decode attention reads 280 MB of fp32 K/V (30 layers x 2 x 3 KV heads x 64 x 4 bytes x 6080 tokens),
140 MB in bf16.
Part 2, fidelity: the fixed text of bench/int8_fidelity.py teacher-forced through DECODE steps (a prefill
alone never reads the cache: its attention takes this step's K/V), one token a step after an 8-token
prefill, so every logit comes from attention over the cache: perplexity of each cache, and how often the
bf16 cache's argmax equals the fp32 cache's (also where fp32's top-2 margin is over 1 logit).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def use_cache(runner, dtype) -> None:
    """Give the runner a fresh KV cache of `dtype` (the same budget as its own), filled with noise: a
    never-written cache is lazily zeroed memory, every page the one shared zero page, which stays in the CPU's
    caches and would hide exactly the DRAM traffic this measures."""
    runner.kv_dtype = dtype
    runner._allocate_kv_cache(runner.max_model_len)
    runner.kv_cache.normal_()


def time_steps(runner, caches: dict, reps: int, rows_list: list[int]) -> dict:
    """{rows: {name: ms}}: decode steps of `rows` rows at context 190, the KV cache swapped step by step."""
    import torch
    from int8_profile import run_step, step

    result = {}
    for rows in rows_list:
        out = step(rows, 0, 190, runner.block_size)
        times: dict[str, list[float]] = {name: [] for name in caches}
        with torch.inference_mode():
            for i in range(reps + 2):
                for name, (cache, views) in caches.items():
                    runner.kv_cache, runner.kv_caches = cache, views
                    t = time.perf_counter()
                    run_step(runner, out)
                    if i >= 2:
                        times[name].append((time.perf_counter() - t) * 1e3)
        result[rows] = {name: sorted(ts)[len(ts) // 4] for name, ts in times.items()}
    return result


def decode_logits(runner, ids: list[int], first: int = 8):
    """Logits [len(ids) - first, V] predicting ids[first:]: ids[:first] prefilled, then one decode a token."""
    import torch
    from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput

    blocks = list(range(-(-len(ids) // runner.block_size)))
    rows = []
    with torch.inference_mode():
        for pos in range(first - 1, len(ids) - 1):
            chunk = ids[:first] if pos == first - 1 else [ids[pos]]
            start = 0 if pos == first - 1 else pos
            input_ids, positions, meta, sel = runner.prepare(
                SchedulerOutput(seqs=[ScheduledSeq(0, chunk, start, blocks, True)]))
            hidden = runner.model(input_ids, positions, meta, runner.kv_caches)
            rows.append(runner.model.compute_logits(hidden if sel is None else hidden[sel])[-1].float())
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15, help="timed passes per shape and cache")
    args = ap.parse_args(argv)
    import torch
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model_runner import ModelRunner
    from int8_fidelity import TEXT
    from paged_decode_ab import cpu_flags

    runner = ModelRunner(EngineConfig(model=str(bundled_model_path()), dtype="auto", device="cpu",
                                      quantization="int8", threads=args.threads, max_model_len=1024,
                                      kv_cache_memory=512 << 20, max_num_seqs=64))
    default = runner.kv_dtype
    caches = {}
    for dtype in (torch.float32, torch.bfloat16):
        use_cache(runner, dtype)
        caches[str(dtype)[6:]] = (runner.kv_cache, runner.kv_caches)
    print(f"CPU flags: {cpu_flags()}; {torch.get_num_threads()} threads; --quantization int8, bundled SmolLM2-135M; "
          f"this CPU's int8 KV cache: {str(default)[6:]}; both measured in one process")
    print("\n| rows | context | fp32 KV ms/step | bf16 KV ms/step | fp32/bf16 |")
    print("|---:|---:|---:|---:|---:|")
    for rows, t in time_steps(runner, caches, args.reps, [32, 1]).items():
        print(f"| {rows} | 190 | {t['float32']:.2f} | {t['bfloat16']:.2f} | {t['float32'] / t['bfloat16']:.2f}x |",
              flush=True)
    ids = runner.tokenizer.encode(TEXT)
    logits = {}
    for name, (cache, views) in caches.items():
        runner.kv_cache, runner.kv_caches = cache, views
        logits[name] = decode_logits(runner, ids)
    targets = torch.tensor(ids[8:])
    ref = logits["float32"]
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1.0
    print(f"\nfidelity: {len(ids)} tokens of bench/int8_fidelity.py's text, {len(targets)} decode steps")
    print("| KV cache | perplexity | top-1 = fp32 KV | where fp32 margin > 1 logit |")
    print("|---|---:|---:|---:|")
    for name, lg in logits.items():
        ppl = math.exp(float(torch.nn.functional.cross_entropy(lg, targets)))
        agree = ref.argmax(-1) == lg.argmax(-1)
        print(f"| {name} | {ppl:.3f} | {100 * float(agree.float().mean()):.1f}% "
              f"| {100 * float(agree[clear].float().mean()):.1f}% of {int(clear.sum())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
