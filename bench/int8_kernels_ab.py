"""Whole CPU steps of `--quantization int8` with the native per-token int8 matmuls against the int8 path
they replaced, beside int4 and bf16: runners in one process, steps interleaved so a busy machine's drift
lands on all alike.

    .venv/bin/python bench/int8_kernels_ab.py --threads 2 --rounds 10

"int8 old": the path up to commit e56affa (2026-12-01): q/k/v, o, gate/up and the LM head on torch's
per-tensor dynamic int8 linear (FBGEMM, `torch.quantize_per_channel` weights), down_proj per-token in eager
torch ops around `torch._int_mm`; rebuilt here from the same smoothed weights. "int8 new": every matmul
quant_int8.Int8PerTokenWeight (oneDNN's pre-packed u8 x s8 GEMM, the quantization and scaling in
engine/csrc/quant_cpu.cpp). Steps: a decode step of 32 rows at context 190, a prefill step of 16
sequences x 128 tokens (32 streams arriving together), a single stream's decode step. Prints the CPU
flags, ms (median / fastest) and the ratios (X vs new: X's ms over new's, > 1 when new is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from int8_profile import cpu_flags, interleaved_ms, step  # noqa: E402


class DynamicInt8:
    """The old path's q/k/v, o, gate/up and LM head: per-tensor activation scale, FBGEMM."""

    def __init__(self, w, bias) -> None:
        import torch

        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()  # [N]
        q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, bias)

    def matmul(self, x, bias=None):
        import torch

        return torch.ops.quantized.linear_dynamic(x, self.packed)


class EagerPerToken:
    """The old path's down_proj: per-token scales in eager torch ops (quant_int8.per_token_int8_mm)."""

    def __init__(self, w) -> None:
        from gearshift.engine.model.quant_int8 import quantize_rows

        self.qt, amax = quantize_rows(w)  # per output row: the same int8 weight and scales
        self.col = (amax[:, 0] / 127.0) / 127.0
        self.out_features = w.shape[0]

    def matmul(self, x, bias=None):
        from gearshift.engine.model.quant_int8 import per_token_int8_mm

        y = per_token_int8_mm(x.reshape(-1, x.shape[-1]), self.qt.t(), self.col, bias)
        return y.view(*x.shape[:-1], self.out_features)


def old_int8_runner(cfg):
    """A runner whose int8 matmuls are built the old way (Linear.quantize_int8 swapped while it loads)."""
    from gearshift.engine.model.layers import Linear
    from gearshift.engine.model_runner import ModelRunner

    new = Linear.quantize_int8

    def old(self, col_scale=None):
        import sys as _sys

        w = self.weight.detach().float()
        w = w if col_scale is None else w * col_scale
        bias = self.bias.detach().float() if self.bias is not None else None
        small = EagerPerToken(w) if w.shape[1] > w.shape[0] * 2 else DynamicInt8(w, bias)  # down_proj: K > 2N
        self.set_small(small, _sys.maxsize)

    Linear.quantize_int8 = old
    try:
        return ModelRunner(cfg)
    finally:
        Linear.quantize_int8 = new


def prefill_step(n: int, length: int, block_size: int):
    from gearshift.engine.scheduler_output import ScheduledSeq, SchedulerOutput

    per = -(-(length + 1) // block_size)
    seqs = [ScheduledSeq(i, [200 + ((i * 7 + j) % 500) for j in range(length)], 0,
                         list(range(i * per, (i + 1) * per)), True) for i in range(n)]
    return SchedulerOutput(seqs=seqs, num_decodes=0)


def runners(model: str, threads: int, bf16: bool) -> dict:
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model_runner import ModelRunner

    def cfg(quant: str, dtype: str = "auto") -> EngineConfig:
        return EngineConfig(model=model, dtype=dtype, device="cpu", quantization=quant, threads=threads,
                            max_model_len=1024, kv_cache_memory=512 << 20, max_num_seqs=64)

    rs = {"int8 old": old_int8_runner(cfg("int8")), "int8 new": ModelRunner(cfg("int8"))}
    if bf16:  # int4 and bf16 run on CPUs with avx512_bf16 only
        rs |= {"int4": ModelRunner(cfg("int4")), "bf16": ModelRunner(cfg("none", "bfloat16"))}
    return rs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.model_runner import cpu_has_fast_bf16

    rs = runners(args.model or str(bundled_model_path()), args.threads, cpu_has_fast_bf16())
    bs = rs["int8 new"].block_size
    print(f"CPU flags: {cpu_flags()}; {args.threads} threads; {args.rounds} interleaved steps each, "
          "ms as median / fastest (the fastest is the less disturbed on a shared machine)")
    print("| step | " + " | ".join(f"{k} ms" for k in rs) + " | new vs old | new vs int4 | new vs bf16 |")
    print("|---|" + "---:|" * (len(rs) + 3))
    for label, out in (("decode 32 rows, ctx 190", step(32, 0, 190, bs)),
                       ("prefill 16 x 128 tokens", prefill_step(16, 128, bs)),
                       ("decode 1 row, ctx 190", step(1, 0, 190, bs))):
        times = interleaved_ms(rs, out, args.rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        cells = [f"{med[k]:.1f} / {best[k]:.1f}" for k in rs]
        ratios = [f"{med[k] / med['int8 new']:.2f}x / {best[k] / best['int8 new']:.2f}x" if k in med else "-"
                  for k in ("int8 old", "int4", "bf16")]
        print(f"| {label} | " + " | ".join(cells + ratios) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
