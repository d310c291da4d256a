"""The int8 GEMMs quant_int8.Int8PerTokenWeight chooses between, on SmolLM2-135M's matrix shapes: oneDNN's
pre-packed u8 x s8 linear (`onednn.qlinear_pointwise`), `torch._int_mm` on a plain int8 weight, and the
per-tensor FBGEMM dynamic linear the int8 path used before 2026-12-01; GEMM only (inputs pre-quantized).

    .venv/bin/python bench/int8_gemm_shapes.py --threads 1

Prints the CPU flags and, per shape and row count, the 10th-percentile us of each (robust to a busy box).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from int8_profile import cpu_flags  # noqa: E402

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]  # (K, N): q/k/v, o, gate/up, down, head


def p10_us(fn, n: int) -> float:
    for _ in range(5):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 10] * 1e6


def row(k: int, n: int, m: int) -> tuple[float, float, float]:
    import torch

    wq = torch.randint(-127, 127, (n, k), dtype=torch.int8)
    scale, zp = torch.rand(n) / 127, torch.zeros(n, dtype=torch.int32)
    packed, wt = torch.ops.onednn.qlinear_prepack(wq, None), wq.t()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_per_channel is deprecated: the old path, measured only
        q = torch.quantize_per_channel(wq.float(), scale.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    fb = torch.ops.quantized.linear_prepack(q, None)
    xu = torch.randint(0, 255, (m, k), dtype=torch.uint8)
    xs, x = (xu.int() - 128).to(torch.int8), torch.randn(m, k)
    reps = 200 if n * k < 1 << 22 else 20
    onednn = p10_us(lambda: torch.ops.onednn.qlinear_pointwise(xu, 1.0, 128, packed, scale, zp, None, 1.0, 0,
                                                                torch.float32, "none", [], ""), reps)
    int_mm = p10_us(lambda: torch._int_mm(xs, wt), reps)
    return onednn, int_mm, p10_us(lambda: torch.ops.quantized.linear_dynamic(x, fb), reps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,2,8,32,2048")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(f"CPU flags: {cpu_flags()}; {args.threads} threads; 10th-percentile us a call")
    print("| K x N | rows | oneDNN pre-packed | _int_mm | FBGEMM dynamic (old) |\n|---|---:|---:|---:|---:|")
    for k, n in SHAPES:
        for m in (int(r) for r in args.rows.split(",")):
            if m * n > 1 << 24:
                continue  # the LM head runs on a step's last rows only
            a, b, c = row(k, n, m)
            print(f"| {k} x {n} | {m} | {a:.1f} | {b:.1f} | {c:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
