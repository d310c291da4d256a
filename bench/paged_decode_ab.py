"""The native CPU paged decode kernel (engine/csrc/paged_decode_cpu.cpp) against an earlier version of
it, both in ONE process, interleaved call by call so a busy VM's drift lands on both.

    nice -n -5 .venv/bin/python bench/paged_decode_ab.py                  # base e56affa (pre-vectorized)
    nice -n -5 .venv/bin/python bench/paged_decode_ab.py --base HEAD~3 --no-step

"old" is the whole kernel module (cpu_kernels.SOURCES) built with `git show BASE:engine/csrc/
paged_decode_cpu.cpp` in place of today's file, in a temporary directory; "new" is the working tree's
module (cpu_kernels.kernels()). Part 1, the kernel alone: SmolLM2-135M's attention shape (9 query heads
over 3 KV heads, head_dim 64, block 16) at rows 1/8/32 x context 190/1000, fp32 and bf16, one call per
layer over 30 layers' own caches (blocks scattered at random, so K/V come from DRAM as in a real step):
us per layer (lower quartile), old/new, and the largest |old - new| of the outputs. Part 2, the whole
step: a decode step of 32 rows (and of 1) at context 190 (bench/int8_profile.py's shape) of the bundled
model with --quantization int4 (bf16 KV cache) and int8 (fp32 KV cache), the module swapped step by step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "engine/csrc/paged_decode_cpu.cpp"
HQ, HKV, D, BS, LAYERS = 9, 3, 64, 16, 30


def cpu_flags() -> str:
    with open("/proc/cpuinfo") as f:
        flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    return " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if x in flags)


def build_base(base: str, into: Path):
    """The kernel module with BASE's paged_decode_cpu.cpp, built in `into` under another name."""
    from gearshift.engine import cpu_kernels
    from torch.utils.cpp_extension import load

    src = into / "src"
    src.mkdir(parents=True)
    for path in [*cpu_kernels.SOURCES, *cpu_kernels.HEADERS]:
        shutil.copy(path, src / path.name)
    old = subprocess.run(["git", "show", f"{base}:{KERNEL}"], cwd=ROOT, capture_output=True, text=True, check=True)
    (src / Path(KERNEL).name).write_text(old.stdout)
    bin_dir = Path(sys.executable).parent  # ninja lives beside the venv's python
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return load(name="gearshift_paged_decode_base", sources=[str(src / p.name) for p in cpu_kernels.SOURCES],
                extra_cflags=cpu_kernels._flags(), build_directory=str(into), verbose=False)


def layer_inputs(rows: int, ctx: int, dtype, gen):
    """One layer's decode call: q [2 * rows, Hq, D] (decode rows odd), its caches, tables, lengths, rows."""
    import torch

    need = -(-ctx // BS)
    nblocks = rows * need + 1
    kc, vc = (torch.randn(nblocks, BS, HKV, D, generator=gen).to(dtype) for _ in range(2))
    tables = torch.randperm(nblocks, generator=gen)[: rows * need].view(rows, need).to(torch.int32)
    q = torch.randn(2 * rows, HQ, D, generator=gen).to(dtype)
    lens = torch.full((rows,), ctx, dtype=torch.int32)
    return q, kc, vc, tables, lens, torch.arange(rows, dtype=torch.int64) * 2 + 1


def time_kernels(mods: dict, rows: int, ctx: int, dtype, reps: int) -> tuple[dict[str, float], float]:
    """us per layer (lower quartile of `reps` passes over LAYERS layers) for each module; max |old - new|."""
    import torch

    gen = torch.Generator().manual_seed(rows * 7919 + ctx)
    layers = [layer_inputs(rows, ctx, dtype, gen) for _ in range(LAYERS)]
    outs = {name: [torch.zeros_like(x[0]) for x in layers] for name in mods}
    times: dict[str, list[float]] = {name: [] for name in mods}
    for i in range(reps + 2):
        for name, mod in mods.items():
            t = time.perf_counter()
            for (q, kc, vc, bt, lens, idx), out in zip(layers, outs[name], strict=True):
                mod.paged_decode(q, kc, vc, bt, lens, idx, out, D**-0.5, 0)
            if i >= 2:
                times[name].append((time.perf_counter() - t) / LAYERS * 1e6)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(outs["old"], outs["new"], strict=True))
    return {name: sorted(ts)[len(ts) // 4] for name, ts in times.items()}, diff


def time_steps(mods: dict, quantization: str, threads: int, reps: int, rows_list: list[int]) -> dict:
    """{rows: {module: ms}}: a decode step of `rows` rows at context 190 (lower quartile), the kernel
    module swapped step by step."""
    import torch
    from gearshift.engine import cpu_kernels
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.config import EngineConfig
    from gearshift.engine.model_runner import ModelRunner

    sys.path.insert(0, str(ROOT / "bench"))
    from int8_profile import run_step, step

    runner = ModelRunner(EngineConfig(model=str(bundled_model_path()), dtype="auto", device="cpu",
                                      quantization=quantization, threads=threads, max_model_len=1024,
                                      kv_cache_memory=512 << 20, max_num_seqs=64))
    if quantization == "int8":  # the old kernel takes one dtype for q and the caches: int8's fp32 cache
        runner.kv_dtype = torch.float32
        runner._allocate_kv_cache(runner.max_model_len)
    # Noise, not the lazily zeroed cache: never-written pages are all the one shared zero page, which stays
    # in the CPU's caches and would hide the DRAM traffic of a real decode (bench/kv_bf16_ab.py does the same).
    runner.kv_cache.normal_()
    result = {}
    for rows in rows_list:
        out = step(rows, 0, 190, runner.block_size)
        times: dict[str, list[float]] = {name: [] for name in mods}
        with torch.inference_mode():
            for i in range(reps + 2):
                for name, mod in mods.items():
                    cpu_kernels._cache["module"] = mod
                    t = time.perf_counter()
                    run_step(runner, out)
                    if i >= 2:
                        times[name].append((time.perf_counter() - t) * 1e3)
        result[rows] = {name: sorted(ts)[len(ts) // 4] for name, ts in times.items()}
    cpu_kernels._cache["module"] = mods["new"]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="e56affa", help="commit of the old kernel (default: the last one before "
                    "the vectorized GQA-sharing kernel)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15, help="timed passes per shape and module")
    ap.add_argument("--no-step", action="store_true", help="skip part 2 (the whole model step)")
    args = ap.parse_args(argv)
    import torch
    from gearshift.engine import cpu_kernels

    new = cpu_kernels.kernels()
    assert new is not None, "the native CPU kernels did not build (see the log)"
    with tempfile.TemporaryDirectory(prefix="paged-decode-base-") as tmp:
        mods = {"old": build_base(args.base, Path(tmp)), "new": new}
        torch.set_num_threads(args.threads)
        print(f"CPU flags: {cpu_flags()}; {torch.get_num_threads()} threads; old = {args.base}:{KERNEL}, "
              f"new = working tree; Hq {HQ}, Hkv {HKV}, head_dim {D}, block {BS}, {LAYERS} layers' caches")
        print("\n| dtype | rows | context | old us/layer | new us/layer | old/new | max abs diff |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for dtype in (torch.bfloat16, torch.float32):
            for rows in (1, 8, 32):
                for ctx in (190, 1000):
                    t, diff = time_kernels(mods, rows, ctx, dtype, args.reps)
                    print(f"| {str(dtype)[6:]} | {rows} | {ctx} | {t['old']:.1f} | {t['new']:.1f} | "
                          f"{t['old'] / t['new']:.2f}x | {diff:.1e} |", flush=True)
        if not args.no_step:
            print("\nwhole decode step at context 190 (bundled SmolLM2-135M)")
            print("| quantization | KV cache | rows | old ms/step | new ms/step | old/new |")
            print("|---|---|---:|---:|---:|---:|")
            for quant, kv in (("int4", "bf16"), ("int8", "fp32")):  # int8's cache as before the bf16 one
                for rows, t in time_steps(mods, quant, args.threads, args.reps, [1, 32]).items():
                    print(f"| {quant} | {kv} | {rows} | {t['old']:.2f} | {t['new']:.2f} | "
                          f"{t['old'] / t['new']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
