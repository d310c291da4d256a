"""Whole CPU steps of `--quantization int8` before and after smoothing (down_proj and the LM head int8),
two runners in one process, steps interleaved so a busy machine's drift lands on both alike.

    .venv/bin/python bench/int8_step_ab.py --threads 2 --rounds 20

"before": quantize_int8_for_cpu without calibration (q/k/v, o, gate/up int8; down_proj, LM head fp32), the
shipped mode up to 2026-12-01; "after": the calibrated, smoothed one the runner builds now. Prints the CPU
flags and, per step shape (bench/int8_profile.py's two), the median ms and after/before speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from int8_profile import cpu_flags, interleaved_ms, step  # noqa: E402


def runners(model: str, threads: int):
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model_runner import ModelRunner

    cfg = EngineConfig(model=model, device="cpu", quantization="int8", threads=threads, max_model_len=1024,
                       kv_cache_memory=512 << 20, max_num_seqs=64)
    after = ModelRunner(cfg)
    calibrate = ModelRunner._int8_calibration
    ModelRunner._int8_calibration = lambda self: None  # the uncalibrated path: down_proj, LM head fp32
    try:
        before = ModelRunner(cfg)
    finally:
        ModelRunner._int8_calibration = calibrate
    return {"before": before, "after": after}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    from gearshift.engine.bundled import bundled_model_path

    rs = runners(args.model or str(bundled_model_path()), args.threads)
    print(f"CPU flags: {cpu_flags()}; {args.threads} threads; median of {args.rounds} interleaved steps")
    print("| step | before ms | after ms | after speed |\n|---|---:|---:|---:|")
    bs = rs["after"].block_size
    for label, out in (("decode 32 rows, ctx 190", step(32, 0, 190, bs)),
                       ("31 decodes + 128-token prefill", step(31, 128, 190, bs)),
                       ("decode 1 row, ctx 190", step(1, 0, 190, bs))):
        times = interleaved_ms(rs, out, args.rounds)
        b, a = statistics.median(times["before"]), statistics.median(times["after"])
        print(f"| {label} | {b:.2f} | {a:.2f} | {b / a:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
