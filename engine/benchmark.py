"""`gearshift bench`: offline throughput of the paged engine on a model, as a table.

The workload is the issue's: N requests, prompt lengths uniform in [32, 256], output lengths uniform in
[16, 256], ignore_eos with per-request max_tokens, fixed seed. MFU = 2 x parameters x (prompt + output
tokens) / wall time / the matmul peak this machine reaches at that dtype (measured first, same threads).
bench/offline.py runs the same workload against Hugging Face transformers baselines.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from typing import get_args

from gearshift.engine.config import DType, EngineConfig
from gearshift.engine.errors import GearshiftError
from gearshift.engine.settings import add_arguments as add_settings
from gearshift.engine.thread_wait import apply_thread_wait

# The engine settings `gearshift bench` takes, as EngineConfig declares them (flags, help, defaults).
ENGINE_SETTINGS = ("device", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory",
                   "threads", "thread_wait")


@dataclass
class Workload:
    requests: list[tuple[list[int], int]]  # (prompt token ids, output tokens to generate)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p, _ in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(m for _, m in self.requests)


@dataclass
class Result:
    system: str
    dtype: str
    wall_s: float
    prompt_tokens: int
    output_tokens: int
    peak_flops: float | None = None  # the machine's measured matmul peak at this dtype
    num_params: int | None = None
    note: str = ""

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s

    @property
    def mfu(self) -> float | None:
        if not self.peak_flops or not self.num_params:
            return None
        return 2 * self.num_params * (self.prompt_tokens + self.output_tokens) / self.wall_s / self.peak_flops


def parse_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":")) if ":" in text else (int(text),) * 2
    except ValueError:
        raise GearshiftError(f"a length range is LO:HI, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise GearshiftError(f"a length range needs 1 <= LO <= HI, got {text!r}")
    return lo, hi


def make_workload(vocab_size: int, num_requests: int = 64, prompt_range: tuple[int, int] = (32, 256),
                  output_range: tuple[int, int] = (16, 256), seed: int = 0, low_id: int = 100) -> Workload:
    """Random token ids (above the special tokens at the bottom of the vocabulary), reproducible."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(num_requests):
        plen = rng.randint(*prompt_range)
        reqs.append(([rng.randrange(low_id, vocab_size) for _ in range(plen)], rng.randint(*output_range)))
    return Workload(reqs)


PEAK_SHAPES = ((1024, 1024, 1024), (512, 576, 1536), (2048, 576, 576))  # (M, K, N): square, and model-like
GPU_PEAK_SHAPES = ((8192, 8192, 8192), (4096, 4096, 14336))


def measure_matmul_peak(dtype, seconds_per_shape: float = 1.0, device: str = "cpu") -> float:
    """Best FLOP/s of `F.linear` (the op every projection runs) over a few shapes, at this dtype and the
    current torch thread count. The best of several shapes, because a dtype's fast kernel may only kick in
    for some (on CPUs without native bf16, bf16 `mm` and `linear` take very different paths). On CUDA the
    shapes are large enough to fill the GPU, and each sample is timed from synchronize to synchronize."""
    import torch

    cuda = torch.device(device).type == "cuda"
    best_rate = 0.0
    for m, k, n in GPU_PEAK_SHAPES if cuda else PEAK_SHAPES:
        x = torch.randn(m, k, device=device).to(dtype)
        w = torch.randn(n, k, device=device).to(dtype)
        torch.nn.functional.linear(x, w)  # warm-up
        if cuda:
            torch.cuda.synchronize(device)
        deadline = time.perf_counter() + seconds_per_shape
        best = float("inf")
        for _ in range(50):
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            if cuda:
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t)
            if time.perf_counter() > deadline:
                break
        best_rate = max(best_rate, 2 * m * k * n / best)
    return best_rate


def run_paged(llm, workload: Workload, dtype_name: str) -> Result:
    """All requests submitted at once; the wall time covers scheduling, the model and sampling."""
    from gearshift.engine.sampling_params import SamplingParams

    prompts = [{"prompt_token_ids": p} for p, _ in workload.requests]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in workload.requests]
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    produced = sum(len(o.token_ids) for o in outs)
    if produced != workload.output_tokens:
        raise GearshiftError(f"paged engine produced {produced} tokens, expected {workload.output_tokens}")
    return Result("gearshift paged", dtype_name, wall, workload.prompt_tokens, produced)


def format_table(results: list[Result], baselines: dict[str, dict[str, Result]] | None = None) -> str:
    """One row per (system, dtype). For each named baseline, a column: output tok/s over the baseline's
    output tok/s at the same dtype."""
    baselines = baselines or {}
    head = ["system", "dtype", "wall s", "prompt tok", "output tok", "out tok/s", "all tok/s", "MFU",
            *(f"vs {name}" for name in baselines)]
    rows = []
    for r in results:
        ratios = []
        for per_dtype in baselines.values():
            base = per_dtype.get(r.dtype)
            ratios.append(f"{r.output_tok_s / base.output_tok_s:.2f}x" if base is not None else "-")
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        rows.append([r.system + (f" ({r.note})" if r.note else ""), r.dtype, f"{r.wall_s:.1f}",
                     str(r.prompt_tokens), str(r.output_tokens), f"{r.output_tok_s:.1f}", f"{r.total_tok_s:.1f}",
                     mfu, *ratios])
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join([line, sep, *body])


def build_llm(model: str, dtype: str, args: argparse.Namespace, enforce_eager: bool = False,
              async_scheduling: str = "auto"):
    from gearshift.engine.llm import LLM

    return LLM(model=model, dtype=dtype, max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
               max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               threads=args.threads, device=args.device, enforce_eager=enforce_eager,
               async_scheduling=async_scheduling)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a .gguf file or HF model directory (default: bundled SmolLM2)")
    parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes to run")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", default="32:256", help="uniform range LO:HI of prompt tokens")
    parser.add_argument("--output-len", default="16:256", help="uniform range LO:HI of output tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random workload")
    add_settings(parser, EngineConfig, ENGINE_SETTINGS, defaults={"max_model_len": 1024})


def run(args: argparse.Namespace) -> int:
    policy = apply_thread_wait(args.thread_wait)  # before torch loads libgomp
    import torch
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.config import usable_cpus

    model = args.model or str(bundled_model_path())
    if args.num_requests < 1:
        raise GearshiftError("--num-requests must be at least 1")
    prompt_range, output_range = parse_range(args.prompt_len), parse_range(args.output_len)  # fail fast
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in get_args(DType):
            raise GearshiftError(f"--dtype takes {', '.join(get_args(DType))}, got {d!r}")
    torch.set_num_threads(args.threads or usable_cpus())
    results = []
    for dtype in dtypes:
        llm = build_llm(model, dtype, args)
        runner = llm.llm_engine.runner
        workload = make_workload(runner.vocab_size, args.num_requests, prompt_range, output_range, args.seed)
        peak = measure_matmul_peak(runner.dtype, device=str(runner.device))
        run_paged(llm, make_workload(runner.vocab_size, 4, (16, 32), (4, 8), args.seed + 1), dtype)  # warm-up
        r = run_paged(llm, workload, dtype)
        r.peak_flops = peak
        r.num_params = runner.model_config.num_parameters()
        results.append(r)
        del llm
    print(f"model: {model}; {args.num_requests} requests, prompt {args.prompt_len}, output {args.output_len}, "
          f"seed {args.seed}; threads {torch.get_num_threads()}, thread wait {policy}")
    print(format_table(results))
    return 0
