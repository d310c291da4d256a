"""Offline throughput: gearshift's paged engine against Hugging Face transformers on the same weights.

    .venv/bin/python bench/offline.py                       # the issue's workload, fp32 and bf16
    .venv/bin/python bench/offline.py --quick               # 8 requests, short lengths: a smoke run

Workload (same for every system): N requests, prompt lengths uniform in [32, 256], output lengths
uniform in [16, 256], ignore_eos with per-request max_tokens, fixed seed, greedy.
Baselines, per dtype:
  - HF naive: `model.generate` one request at a time (what serving without batching does);
  - HF static-32: batches of 32 in arrival order, left-padded, each run to its longest output.
Only the requested tokens count as output for every system (a static batch's extra tokens are waste).
First it measures this machine's matmul peak per dtype; MFU = 2 x params x (prompt + output tokens)
/ wall / peak, with params = every weight used in a forward pass (embeddings once when tied).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

# Before torch loads libgomp: how idle threads wait (GEARSHIFT_THREAD_WAIT=spin|passive, default spin; an
# OMP_WAIT_POLICY in the environment wins). Same process, same setting for every system.
from gearshift.engine.thread_wait import apply_thread_wait, default_policy  # noqa: E402

THREAD_WAIT = apply_thread_wait(default_policy())

import torch  # noqa: E402
from gearshift.engine import cpu_kernels  # noqa: E402
from gearshift.engine.benchmark import (  # noqa: E402
    Result,
    Workload,
    build_llm,
    format_table,
    make_workload,
    measure_matmul_peak,
    parse_range,
    run_paged,
)
from gearshift.engine.bundled import bundled_model_path  # noqa: E402
from gearshift.engine.config import usable_cpus  # noqa: E402
from gearshift.engine.loader import open_model  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: str) -> None:
    """Device work is asynchronous: wall times end only once the GPU has finished."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def load_hf(model: str, dtype: torch.dtype, device: str):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    path = Path(model)
    if path.suffix == ".gguf":  # transformers dequantizes the GGUF: the same weights our loader reads
        m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return m.to(device).eval()


@torch.inference_mode()
def hf_naive(model, workload: Workload, dtype: str, limit: int | None) -> Result:
    reqs = workload.requests[:limit] if limit else workload.requests
    dev = str(model.device)
    sync(dev)
    t = time.perf_counter()
    produced = 0
    for prompt, m in reqs:
        ids = torch.tensor([prompt], device=dev)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=m, min_new_tokens=m,
                             do_sample=False, pad_token_id=0)
        produced += out.shape[1] - ids.shape[1]
    sync(dev)
    wall = time.perf_counter() - t
    note = f"first {len(reqs)} requests" if len(reqs) < len(workload.requests) else ""
    return Result("HF naive", dtype, wall, sum(len(p) for p, _ in reqs), produced, note=note)


@torch.inference_mode()
def hf_static(model, workload: Workload, dtype: str, batch_size: int) -> Result:
    dev = str(model.device)
    sync(dev)
    t = time.perf_counter()
    for i in range(0, len(workload.requests), batch_size):
        batch = workload.requests[i:i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, (prompt, _) in enumerate(batch):  # left padding: every row's last prompt token lines up
            ids[j, width - len(prompt):] = torch.tensor(prompt)
            mask[j, width - len(prompt):] = 1
        longest = max(m for _, m in batch)
        model.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=longest,
                       min_new_tokens=longest, do_sample=False, pad_token_id=0)
    sync(dev)
    wall = time.perf_counter() - t
    return Result(f"HF static-{batch_size}", dtype, wall, workload.prompt_tokens, workload.output_tokens)


def paged_row(model: str, dtype: str, args: argparse.Namespace, workload: Workload, system: str,
              enforce_eager: bool, async_scheduling: str = "auto") -> Result:
    """One paged-engine row: a fresh engine, a small warm-up, then the workload (all submitted at once)."""
    llm = build_llm(model, dtype, args, enforce_eager=enforce_eager, async_scheduling=async_scheduling)
    run_paged(llm, make_workload(llm.llm_engine.runner.vocab_size, 4, (16, 32), (4, 8), args.seed + 1), dtype)  # warm-up
    r = run_paged(llm, workload, dtype)
    r.system, r.note = system, f"preemptions {llm.llm_engine.stats().num_preemptions}, " \
        f"steps ahead {llm.llm_engine.num_async_steps}"
    return r


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or HF directory (default: bundled SmolLM2)")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", default="32:256")
    ap.add_argument("--output-len", default="16:256")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32, help="HF static batch size")
    ap.add_argument("--naive-requests", type=int, default=None,
                    help="run the naive baseline on only the first K requests (its tok/s is per request anyway)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--quick", action="store_true", help="8 requests, prompts 16:64, outputs 8:32")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-memory", default="2Gi")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (every system runs there)")
    ap.add_argument("--compare-eager", action="store_true",
                    help="CUDA: also run the paged engine without CUDA graphs (enforce_eager)")
    ap.add_argument("--compare-async", action="store_true",
                    help="also run the paged engine with async scheduling flipped (CUDA: off, CPU: on; the "
                         "default row is auto: on for CUDA, off on CPU) and print the on/off ratio")
    ap.add_argument("--compare-no-native", action="store_true",
                    help="CPU: also run the paged engine with torch ops only (no engine/csrc kernels)")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_requests, args.prompt_len, args.output_len = 8, "16:64", "8:32"
    return args


def paged_variants(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(system name, how it differs from the default paged row) for every paged row asked for."""
    variants: list[tuple[str, dict[str, Any]]] = [("gearshift paged", {})]
    if args.compare_no_native:
        variants.append(("gearshift paged, torch ops only", {"native": False}))
    if args.compare_eager:
        variants.append(("gearshift paged, eager", {"enforce_eager": True}))
    if args.compare_async:
        flipped = flipped_async(args)
        variants.append((f"gearshift paged, async {flipped}", {"async_scheduling": flipped}))
    return variants


def flipped_async(args: argparse.Namespace) -> str:
    """The async scheduling setting opposite to the default row's (auto: on for CUDA, off on CPU)."""
    return "off" if torch.device(args.device).type == "cuda" else "on"


def run_paged_rows(model: str, dtype: str, args: argparse.Namespace, workload: Workload, peak: float,
                   num_params: int) -> list[Result]:
    """Every paged variant on the workload; with --compare-async, prints the on/off ratio."""
    variants = paged_variants(args)
    rows: list[Result] = []
    for system, how in variants:
        cpu_kernels.set_enabled(how.get("native", True))
        try:
            r = paged_row(model, dtype, args, workload, system, how.get("enforce_eager", False),
                          how.get("async_scheduling", "auto"))
        finally:
            cpu_kernels.set_enabled(True)
        rows.append(report(r, peak, num_params))
    if args.compare_async:  # the same workload, same process: async on / off
        on, off = (rows[-len(variants)], rows[-1])[::1 if flipped_async(args) == "off" else -1]
        print(f"  {dtype} async scheduling on/off: {on.output_tok_s / off.output_tok_s:.3f}x "
              f"({on.output_tok_s:.1f} vs {off.output_tok_s:.1f} out tok/s)", flush=True)
    return rows


def run_hf_rows(model: str, dtype: str, args: argparse.Namespace, workload: Workload, peak: float,
                num_params: int) -> tuple[Result, Result]:
    """(static, naive): the transformers baselines on the workload."""
    hf = load_hf(model, TORCH_DTYPES[dtype], args.device)
    hf.generate(torch.tensor([[100, 101, 102]], device=args.device), max_new_tokens=2, do_sample=False,
                pad_token_id=0)  # warm-up
    static = report(hf_static(hf, workload, dtype, args.batch_size), peak, num_params)
    naive = report(hf_naive(hf, workload, dtype, args.naive_requests), peak, num_params)
    del hf
    return static, naive


def report(r: Result, peak: float, num_params: int) -> Result:
    """A finished row: its MFU inputs set, one progress line printed."""
    r.peak_flops, r.num_params = peak, num_params
    print(f"  {r.dtype} {r.system}: {r.output_tok_s:.1f} out tok/s in {r.wall_s:.1f}s", flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model or str(bundled_model_path())
    threads = args.threads or usable_cpus()
    torch.set_num_threads(threads)
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]

    peaks = {d: measure_matmul_peak(TORCH_DTYPES[d], device=args.device) for d in dtypes}  # first: idle process
    where = (torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda"
             else f"{threads} threads")
    print(f"machine: {where}, torch {torch.__version__}, thread wait {THREAD_WAIT}; "
          "matmul peak: "
          + ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items()), flush=True)

    results: list[Result] = []
    naive: dict[str, Result] = {}
    static: dict[str, Result] = {}
    for dtype in dtypes:
        src = open_model(model).config
        num_params = src.num_parameters()
        workload = make_workload(src.vocab_size, args.num_requests, parse_range(args.prompt_len),
                                 parse_range(args.output_len), args.seed)
        results += run_paged_rows(model, dtype, args, workload, peaks[dtype], num_params)
        if args.skip_hf:
            continue
        static[dtype], naive[dtype] = run_hf_rows(model, dtype, args, workload, peaks[dtype], num_params)
        results += [static[dtype], naive[dtype]]

    print(f"\nmodel: {Path(model).name}; {args.num_requests} requests, prompt {args.prompt_len}, "
          f"output {args.output_len} tokens, seed {args.seed}, greedy, ignore_eos; {where}")
    order = {"HF naive": 0}
    results.sort(key=lambda r: (dtypes.index(r.dtype), order.get(r.system, 1 if r.system.startswith("HF") else 2)))
    print(format_table(results, {"HF naive": naive, f"HF static-{args.batch_size}": static} if naive else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
