"""Concurrency 1 on a shared machine: paged, paged-int4 and llama-server, requests in turn.

bench/serve.py measures one server after the other, so on a busy VM (other jobs starting and stopping)
each system sees a different machine and the ratios at concurrency 1 swing by 10x. Here all servers are
up together and requests rotate among them (A, B, C, B, C, A, ...; every round on the same prompt), so
drift lands on all alike; an idle server waits on a socket. Same client, prompts (128 tokens, 128 out,
greedy, ignore_eos), threads and thread-wait policy as bench/serve.py.

    nice -n -5 .venv/bin/python bench/single_stream.py --rounds 12

Prints per-system output tokens/s (all tokens / all request time), TTFT and TPOT medians, and each one's
ratio to llama-server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

from gearshift.engine.thread_wait import apply_thread_wait, default_policy  # noqa: E402

THREAD_WAIT = apply_thread_wait(default_policy())  # before anything loads libgomp; the servers inherit it
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # siblings (PYTHONSAFEPATH=1 omits it)

from gearshift.engine.config import usable_cpus  # noqa: E402
from gguf_overhead import server_request, summarize  # noqa: E402
from serve_load import make_prompts  # noqa: E402
from serve_servers import build_llama_server, free_port, gearshift_cmd, llama_server_cmd, started  # noqa: E402

QUANT = {"paged": [], "paged-int8": ["--quantization", "int8"], "paged-int4": ["--quantization", "int4"]}


def _flags() -> str:
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "").split()
    return " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if x in flags)


def _cmd(target: str, model: str, threads: int, ctx: int) -> tuple[list[str], str]:
    if target == "llama-server":
        return llama_server_cmd(build_llama_server(), model, free_port(), threads, 1, ctx, []), "/health"
    return gearshift_cmd("paged", model, free_port(), threads, 1, max(ctx, 1024), QUANT[target]), "/ready"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M Q4_1)")
    p.add_argument("--targets", default="paged,paged-int4,llama-server", help=f"from {', '.join([*QUANT, 'llama-server'])}")
    p.add_argument("--rounds", type=int, default=12, help="requests per system")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=usable_cpus())
    args = p.parse_args(argv)
    from gearshift.engine.bundled import bundled_model_path

    model = args.model or str(bundled_model_path())
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    prompts = make_prompts(model, args.rounds + 1, args.prompt_tokens)
    ctx = args.prompt_tokens + args.max_tokens + 64
    print(f"model {model}; CPU flags: {_flags()}; threads {args.threads}, thread wait {THREAD_WAIT}; "
          f"{args.rounds} rounds of {args.prompt_tokens} in / {args.max_tokens} out", flush=True)
    results: dict[str, list] = {t: [] for t in targets}
    with contextlib.ExitStack() as stack:
        servers = {t: stack.enter_context(started(t, *_cmd(t, model, args.threads, ctx))) for t in targets}
        for s in servers.values():  # first-call costs are not what is compared
            asyncio.run(server_request(s.url, prompts[-1], 8))
        for i, prompt in enumerate(prompts[:-1]):
            order = targets[i % len(targets):] + targets[: i % len(targets)]  # who goes first rotates
            for t in order:
                results[t].append(asyncio.run(server_request(servers[t].url, prompt, args.max_tokens)))
    rows = {t: summarize(t, r) for t, r in results.items()}
    base = rows.get("llama-server")
    print("| system | out tok/s | TTFT p50 ms | TPOT p50 ms | / llama-server |")
    print("|---|---:|---:|---:|---:|")
    for t, r in rows.items():
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "-"
        print(f"| {t} | {r['tok_s']:.1f} | {r['ttft_ms']:.0f} | {r['tpot_ms']:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
