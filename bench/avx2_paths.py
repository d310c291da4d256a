"""The paged engine's CPU paths as an AVX2-only CPU runs them, measured on an AVX-512 one with the instruction
sets restricted: dense fp32 (what `dtype: auto` picks without native bf16) against --quantization int8 and
int4, runners in one process, steps interleaved so a busy machine's drift lands on all alike.

    nice -n -5 .venv/bin/python bench/avx2_paths.py --threads 2 --rounds 10

--isa avx2 (default) sets, before torch loads: ATEN_CPU_CAPABILITY=avx2 (ATen's kernels),
ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN's matmuls, fp32 and int8; engine/dtypes.py then takes the no-native-bf16
choices: fp32 activations, fp32 KV cache under int8, int4 refused) and GEARSHIFT_CPU_AVX512=0 (the native
kernels' 8-wide paths). --isa native runs the same table unrestricted. int4 is refused on a CPU without
native bf16; the int4 row is built past that refusal (bf16 activations, emulated) to show what it would cost.
Memory bandwidth and caches stay this machine's: a restricted VM, not an AVX2 machine.

Prints the CPU flags, the ISA each library reports, each runner's dtypes, then per step ms (median / fastest)
and the dense runner's ms over each other's (> 1: faster than dense; dense is fp32 under --isa avx2, bf16 under
--isa native on a CPU with avx512_bf16).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from int8_kernels_ab import prefill_step  # noqa: E402
from int8_profile import cpu_flags, interleaved_ms, step  # noqa: E402

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "GEARSHIFT_CPU_AVX512": "0"}


def onednn_isa() -> str:
    """The ISA oneDNN reports (its verbose header line), read from fd 1 around one small matmul."""
    import torch

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as f:
        os.dup2(f.fileno(), 1)
        try:
            w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(64, 64), 4)
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.ops.mkldnn._linear_pointwise(torch.randn(4, 64), w, None, "none", [], "")
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return next((ln.split("isa:", 1)[1].strip() for ln in f if "isa:" in ln), "unknown")


def runners(model: str, threads: int, int4: bool, vnni_layouts: bool = False) -> dict:
    """dense (`dtype: auto`: fp32 where bf16 is not native), int8, and int4 (past its refusal where refused);
    vnni_layouts: also int8 with the layouts a VNNI CPU keeps (oneDNN's packed GEMM), the choice before 2026-12-01."""
    from gearshift.engine import model_runner
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.errors import GearshiftError
    from gearshift.engine.model import quant_int8

    def cfg(quant: str) -> EngineConfig:  # the A/B scripts' settings (bench/int8_kernels_ab.py)
        return EngineConfig(model=model, device="cpu", quantization=quant, threads=threads,
                            max_model_len=1024, kv_cache_memory=512 << 20, max_num_seqs=64)

    rs = {"dense": model_runner.ModelRunner(cfg("none")), "int8": model_runner.ModelRunner(cfg("int8"))}
    if vnni_layouts:
        probe, quant_int8.cpu_has_int8_dot = quant_int8.cpu_has_int8_dot, (lambda: True)
        try:
            rs["int8 (VNNI layouts)"] = model_runner.ModelRunner(cfg("int8"))
        finally:
            quant_int8.cpu_has_int8_dot = probe
    if int4:
        try:
            rs["int4"] = model_runner.ModelRunner(cfg("int4"))
        except GearshiftError as e:
            print(f"int4 as the engine runs it here: refused ({e})")
            rs["int4 (forced)"] = forced_int4(cfg("int4"))
    return rs


def forced_int4(cfg):
    """An int4 runner past the refusal: bf16 activations (emulated); the dense bf16 copies for steps over
    INT4_MAX_ROWS rows stay unpacked where oneDNN cannot pre-pack bf16 (under an AVX2 cap it cannot)."""
    from gearshift.engine import model_runner
    from gearshift.engine.model.llama import LlamaForCausalLM

    probe, prepack = model_runner.cpu_has_fast_bf16, LlamaForCausalLM.prepack_for_cpu

    def prepack_or_plain(self, batch_hint):
        try:
            prepack(self, batch_hint)
        except RuntimeError as e:  # what the runner's dense path does too: plain matmuls
            print(f"int4 (forced): dense bf16 weights left unpacked ({str(e).splitlines()[0]})")
            for m in self.modules():
                if hasattr(m, "packed"):
                    m.packed = None

    model_runner.cpu_has_fast_bf16, LlamaForCausalLM.prepack_for_cpu = (lambda: True), prepack_or_plain
    try:
        return model_runner.ModelRunner(cfg)
    finally:
        model_runner.cpu_has_fast_bf16, LlamaForCausalLM.prepack_for_cpu = probe, prepack


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--isa", choices=("avx2", "native"), default="avx2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved decode steps per runner")
    ap.add_argument("--prefill-rounds", type=int, default=3, help="interleaved 16 x 128 prefill steps per runner")
    ap.add_argument("--no-int4", action="store_true")
    ap.add_argument("--decode-rows", default="1,4,32", help="decode step sizes (rows), comma-separated")
    ap.add_argument("--int8-vnni-layouts", action="store_true",
                    help="also int8 with a VNNI CPU's layouts (quant_int8.plain_rows_for), the choice before 2026-12-01")
    args = ap.parse_args(argv)
    if args.isa == "avx2":  # before torch loads: ATen and oneDNN read them once
        os.environ.update(AVX2_ENV)
    import torch
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.dtypes import cpu_has_fast_bf16

    print(f"CPU flags: {cpu_flags()}; {args.threads} threads")
    print(f"forced ISA ({args.isa}): " + " ".join(f"{k}={os.environ.get(k, '')}" for k in AVX2_ENV))
    print(f"ATen capability {torch.backends.cpu.get_cpu_capability()}; oneDNN isa {onednn_isa()}; "
          f"engine native bf16: {cpu_has_fast_bf16()}")
    rs = runners(args.model or str(bundled_model_path()), args.threads, not args.no_int4, args.int8_vnni_layouts)
    for name, r in rs.items():
        print(f"{name}: activations {r.dtype}, KV cache {r.kv_dtype}")
    bs = rs["dense"].block_size
    names = list(rs)
    print(f"ms a step as median / fastest ({args.rounds} interleaved steps, {args.prefill_rounds} for prefill); "
          "x: dense's median over the runner's (> 1: faster than dense)")
    print("| step | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n} x" for n in names[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(names) - 1))
    decodes = [(f"decode {m} row{'s' if m > 1 else ''}, ctx 190", step(m, 0, 190, bs), args.rounds)
               for m in (int(r) for r in args.decode_rows.split(","))]
    for label, out, rounds in [*decodes, ("prefill 16 x 128 tokens", prefill_step(16, 128, bs), args.prefill_rounds)]:
        # forced int4's prefill runs unpacked emulated-bf16 matmuls over 2048 rows: minutes a step, skipped
        timed = {n: r for n, r in rs.items() if not (n == "int4 (forced)" and out.num_decodes == 0)}
        times = interleaved_ms(timed, out, rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = [f"{med[n]:.2f} / {min(times[n]):.2f}" if n in med else "-" for n in names]
        ratios = [f"{med['dense'] / med[n]:.2f}x" if n in med else "-" for n in names[1:]]
        print(f"| {label} | " + " | ".join(cells + ratios) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
