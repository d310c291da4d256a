"""Load benchmark for OpenAI-compatible servers: ours (paged, gguf) against llama.cpp's `llama-server`.

    .venv/bin/python bench/serve.py                                  # gguf, paged, llama-server; 1,4,16,32,64
    .venv/bin/python bench/serve.py --targets gguf,llama-server --concurrency 1,4,8,16,32
    .venv/bin/python bench/serve.py --url http://host:8000 --model-name smollm2   # any running server

Workload: closed loop at each concurrency level; streamed `/v1/completions`; distinct prompts of exactly
--prompt-tokens tokens (default 128, counted with the model's own tokenizer); --max-tokens output tokens
(default 128) with `ignore_eos`, greedy. Reports output tokens/s, requests/s, TTFT, TPOT and ITL p50/p99,
errors, and the resident memory (RSS, whole process tree) of each server: after load and peak.
Then the ratios against llama-server, the concurrency where the paged engine overtakes our gguf runner
(the "crossover"), and — with gguf among the targets — gguf at concurrency 1 against `llama_cpp.Llama`
called directly in-process on the same prompts, the two alternating request by request while the gguf
server is up (our HTTP layer's cost; issue 5 wants >= 0.95x; bench/gguf_overhead.py runs just that).

Every server and the in-process baseline get the same --threads (default: the CPUs this process may use)
and the same OpenMP thread-wait policy (GEARSHIFT_THREAD_WAIT=spin|passive; default spin, which every
engine needs on CPUs it owns: see engine/thread_wait.py).
llama-server is built once from the vendored llama.cpp of the installed llama-cpp-python and cached
(bench/llama_server.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import time

from gearshift.engine.thread_wait import apply_thread_wait, default_policy  # noqa: E402

# Before anything loads libgomp; servers inherit it (GEARSHIFT_THREAD_WAIT=spin|passive, default spin).
THREAD_WAIT = apply_thread_wait(default_policy())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # siblings (PYTHONSAFEPATH=1 omits it)

from gguf_overhead import alternate, summarize  # noqa: E402
from serve_load import LevelResult, make_prompts, run_level  # noqa: E402
from serve_servers import (  # noqa: E402
    build_llama_server,
    free_port,
    gearshift_cmd,
    llama_server_cmd,
    started,
)

COLUMNS = [("target", "{:<13}"), ("conc", "{:>4}"), ("reqs", "{:>4}"), ("err", "{:>3}"),
           ("out tok/s", "{:>9.1f}"), ("req/s", "{:>6.2f}"), ("TTFT p50", "{:>8.0f}"), ("TTFT p99", "{:>8.0f}"),
           ("TPOT p50", "{:>8.1f}"), ("TPOT p99", "{:>8.1f}"), ("ITL p50", "{:>7.1f}"), ("ITL p99", "{:>7.1f}")]
KEYS = ["target", "concurrency", "requests", "errors", "output_tok_s", "req_s", "ttft_p50_ms", "ttft_p99_ms",
        "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from gearshift.engine.config import usable_cpus

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="gguf,paged,llama-server",
                   help="comma list of servers to start: gguf, paged, paged-int8 / paged-int4 "
                        "(--quantization int8 / int4), llama-server")
    p.add_argument("--url", default=None, help="benchmark an already running server instead")
    p.add_argument("--model-name", default="smollm2", help="model name sent with --url")
    p.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M Q4_1)")
    p.add_argument("--concurrency", default="1,4,16,32,64", help="comma list of closed-loop levels")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=float, default=2.0, help="requests per level = max(rounds x conc, --min-requests)")
    p.add_argument("--min-requests", type=int, default=6)
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per level (a time window) instead of a request count; bounds long runs")
    p.add_argument("--level-timeout", type=float, default=240.0, help="seconds per level before giving up")
    p.add_argument("--threads", type=int, default=usable_cpus())
    p.add_argument("--no-ignore-eos", action="store_true", help="for servers that reject ignore_eos")
    p.add_argument("--no-baseline", action="store_true", help="skip the in-process llama_cpp.Llama baseline")
    p.add_argument("--paged-args", default="", help="extra flags for `gearshift serve --engine paged`")
    p.add_argument("--gguf-args", default="", help="extra flags for `gearshift serve --engine gguf`")
    p.add_argument("--llama-server-args", default="", help="extra flags for llama-server")
    p.add_argument("--llama-server", default=None, help="llama-server binary (default: build and cache it)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def n_requests(args: argparse.Namespace, conc: int) -> int:
    return max(math.ceil(args.rounds * conc), args.min_requests)


def bench_server(name: str, url: str, model: str, prompts: list[str], levels: list[int],
                 args: argparse.Namespace) -> list[dict]:
    ignore_eos = not args.no_ignore_eos
    # Warm-up (not recorded): first-request costs (graph building, allocator growth) are not load.
    asyncio.run(run_level(url, model, prompts[-2:], 2, 2, 8, ignore_eos, args.level_timeout))
    rows = []
    for conc in levels:
        n = n_requests(args, conc)
        level = asyncio.run(run_level(url, model, prompts, conc, n, args.max_tokens, ignore_eos, args.level_timeout,
                                      args.duration))
        row = {"target": name, **level.summary()}
        errors = [r.error for r in level.requests if r.error]
        if errors:
            row["first_error"] = errors[0]
        rows.append(row)
        print(fmt_row(row) + (f"   first error: {errors[0][:120]}" if errors else ""), flush=True)
    return rows


def _width(f: str) -> int:
    return int(re.search(r"(\d+)", f).group(1))


def fmt_row(row: dict) -> str:
    cells = []
    for (_, f), key in zip(COLUMNS, KEYS, strict=True):
        v = row.get(key)
        nan = isinstance(v, float) and math.isnan(v)
        cells.append("-".rjust(_width(f)) if nan else f.format(v))
    return " ".join(cells)


def header() -> str:
    return " ".join(name.ljust(_width(f)) if i == 0 else name.rjust(_width(f))
                    for i, (name, f) in enumerate(COLUMNS))


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(rows: list[dict], servers: dict[str, dict], baseline: dict | None, levels: list[int]) -> None:
    print("\n== results (times in ms; ITL per streamed chunk; RSS = whole process tree) ==")
    print(header())
    for row in rows:
        print(fmt_row(row))
    if baseline:
        print(fmt_row(baseline))
    if servers:
        print("\nresident memory:")
        for name, s in servers.items():
            print(f"  {name:<13} after load {s['rss_idle'] / 2**20:7.0f} MiB   peak under load {s['rss_peak'] / 2**20:7.0f} MiB")
    by = {(r["target"], r["concurrency"]): r for r in rows}
    names = {r["target"] for r in rows}
    if "llama-server" in names and names & {"paged", "gguf"}:
        print("\noutput tokens/s ratios (and p50 ITL, ms):")
        print(f"{'conc':>4} {'paged/llama-server':>19} {'gguf/llama-server':>18} {'paged/gguf':>11}"
              f" {'ITL paged':>10} {'ITL llama-server':>17}")
        for c in levels:
            p, g, ls = by.get(("paged", c)), by.get(("gguf", c)), by.get(("llama-server", c))
            tok = (lambda r: r["output_tok_s"] if r else None)  # noqa: E731
            itl = (lambda r: f"{r['itl_p50_ms']:.1f}" if r else "-")  # noqa: E731
            print(f"{c:>4} {ratio(tok(p), tok(ls)):>19} {ratio(tok(g), tok(ls)):>18} {ratio(tok(p), tok(g)):>11}"
                  f" {itl(p):>10} {itl(ls):>17}")
    for quant in ("paged-int8", "paged-int4"):
        if {quant, "llama-server"} <= names:
            print(f"\n{quant}: output tokens/s over llama-server's, over paged's (fp32/bf16 weights), and over gguf's:")
            for c in levels:
                q, p, g, ls = (by.get((t, c)) for t in (quant, "paged", "gguf", "llama-server"))
                tok = (lambda r: r["output_tok_s"] if r else None)  # noqa: E731
                print(f"{c:>4} {ratio(tok(q), tok(ls)):>8} {ratio(tok(q), tok(p)):>8} {ratio(tok(q), tok(g)):>8}")
            cross = next((c for c in levels if by.get((quant, c)) and by.get(("gguf", c))
                          and by[(quant, c)]["output_tok_s"] > by[("gguf", c)]["output_tok_s"]), None)
            print(f"crossover {quant} over gguf: concurrency {cross}")
    if {"paged", "gguf"} <= names:
        cross = next((c for c in levels if by.get(("paged", c)) and by.get(("gguf", c))
                      and by[("paged", c)]["output_tok_s"] > by[("gguf", c)]["output_tok_s"]), None)
        if cross is None:
            print("\ncrossover: the paged engine does not overtake gguf within the measured levels")
        else:
            p, g = by[("paged", cross)], by[("gguf", cross)]
            print(f"\ncrossover: paged overtakes gguf at concurrency {cross} "
                  f"({p['output_tok_s']:.1f} vs {g['output_tok_s']:.1f} output tok/s)")
    if baseline and "paired_server" in baseline:
        srv, lib = baseline["paired_server"], baseline["paired_library"]
        print(f"\ngguf server vs llama_cpp.Llama in-process, concurrency 1, alternating requests on the same "
              f"prompts: {srv:.1f} / {lib:.1f} tok/s = {srv / lib:.3f}x (issue 5 target >= 0.95x)")


def paired_baseline(url: str, model: str, prompts: list[str], args: argparse.Namespace, n_ctx: int) -> dict:
    """`llama_cpp.Llama` in this process at concurrency 1, its requests alternating with the gguf server's
    on the same prompts (bench/gguf_overhead.py), so that the machine's drift lands on both alike."""
    n = max(n_requests(args, 1), 8)
    print(f"\n-- in-process llama_cpp.Llama vs the gguf server, {n} alternating pairs", flush=True)
    served, library = alternate(url, model, prompts[: n + 1], args.max_tokens, args.threads, n_ctx)
    lib = LevelResult(1, library, sum(r.end - r.start for r in library))
    return {"target": "llama_cpp-lib", **lib.summary(), "paired_server": summarize("gguf", served)["tok_s"],
            "paired_library": summarize("lib", library)["tok_s"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gearshift.engine.bundled import bundled_model_path

    model = args.model or str(bundled_model_path())
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    n_prompts = max(n_requests(args, c) for c in levels) if args.duration is None else 512
    prompts = make_prompts(model, n_prompts + 2, args.prompt_tokens)
    slot_ctx = args.prompt_tokens + args.max_tokens + 64
    print(f"model {model}\n{len(levels)} levels {levels}, prompt {args.prompt_tokens} tokens, output "
          f"{args.max_tokens} tokens, threads {args.threads}, thread wait {THREAD_WAIT}",
          flush=True)
    rows: list[dict] = []
    servers: dict[str, dict] = {}
    baseline_row = None
    if args.url:
        rows += bench_server("server", args.url.rstrip("/"), args.model_name, prompts, levels, args)
    else:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        for t in targets:
            if t not in ("gguf", "paged", "paged-int8", "paged-int4", "llama-server"):
                print(f"bench/serve.py: unknown target {t!r}", file=sys.stderr)
                return 2
        for t in targets:
            if t == "llama-server":
                binary = args.llama_server or build_llama_server()
                cmd = llama_server_cmd(binary, model, free_port(), args.threads, max(levels), slot_ctx,
                                       args.llama_server_args.split())
                ready = "/health"
            else:
                extra = (args.gguf_args if t == "gguf" else args.paged_args).split()
                extra += ["--quantization", t.split("-")[1]] if t.startswith("paged-") else []
                cmd = gearshift_cmd(t.split("-")[0], model, free_port(), args.threads, max(levels),
                                    max(slot_ctx, 1024), extra)
                ready = "/ready"
            print(f"\n-- {t}: {' '.join(cmd)}", flush=True)
            try:
                with started(t, cmd, ready) as server:
                    rows += bench_server(t, server.url, server.model, prompts, levels, args)
                    servers[t] = {"rss_idle": server.rss_idle, "rss_peak": server.rss_peak}
                    if t == "gguf" and not args.no_baseline and 1 in levels:
                        baseline_row = paired_baseline(server.url, model, prompts, args, max(slot_ctx, 1024))
            except RuntimeError as e:
                print(f"{t}: could not run: {e}", file=sys.stderr, flush=True)
    report(rows, servers, baseline_row, levels)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "servers": servers, "baseline": baseline_row, "args": vars(args),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
