"""bench/serve.py's rows for the agent features, on our two engines: output tokens/s of JSON-schema-guided
requests against free text at concurrency 1 and 32 (the grammar mask's cost; issue 14 wants <= 10% at 32),
and embeddings inputs/s at batch 32.

    .venv/bin/python bench/serve_features.py                       # gguf and paged, concurrency 1 and 32
    .venv/bin/python bench/serve_features.py --targets paged --concurrency 1,8,32 --max-tokens 128

Workload: streamed `/v1/completions`, greedy, `ignore_eos`, --max-tokens output tokens from prompts of
--prompt-tokens tokens (serve.py's prompts). The guided rows send `guided_json` with an unbounded integer
array, so a guided request also runs to max_tokens and both rows move the same number of tokens. Each level
runs free and guided rounds in ABBA order (free, guided, guided, free, --repeats pairs in all), each round
with prompts of its own, and sums each side: on shared CPUs the load drifts, and running all free rounds
before all guided ones would charge the drift to the mask.
Embeddings: `/v1/embeddings` with 32 inputs of --prompt-tokens tokens per call, --embed-calls calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from gearshift.engine.thread_wait import apply_thread_wait, default_policy  # noqa: E402

# Before anything loads libgomp; servers inherit it (GEARSHIFT_THREAD_WAIT=spin|passive; passive on shared CPUs).
THREAD_WAIT = apply_thread_wait(default_policy())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # siblings (PYTHONSAFEPATH=1 omits it)

import httpx  # noqa: E402
from serve_load import LevelResult, RequestResult, make_prompts, one_request  # noqa: E402
from serve_servers import ServerProc, free_port, gearshift_cmd, started  # noqa: E402

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}}


async def level(url: str, prompts: list[str], conc: int, n: int, max_tokens: int, guided: bool) -> LevelResult:
    results: list[RequestResult] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            body = {"model": "smollm2", "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            if guided:
                body["guided_json"] = SCHEMA
            await one_request(url, body, results)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return LevelResult(conc, results, time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """CPU time the process has used so far, all its threads (utime + stime from /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def structured_row(server: ServerProc, prompts: list[str], conc: int, n: int, max_tokens: int, repeats: int) -> str:
    """Free vs guided at one concurrency, rounds in ABBA order (len(prompts) = 2 * repeats * n). Besides
    tokens per wall second, the server's CPU time per token: on shared CPUs wall time swings with the other
    load, the CPU time the server itself spends per token much less."""
    rounds: dict[bool, list[tuple[dict[str, float | int], float]]] = {False: [], True: []}
    order = [False, True, True, False] * (repeats // 2) + [False, True] * (repeats % 2)
    for i, guided in enumerate(order):
        cpu = cpu_seconds(server.proc.pid)
        summary = asyncio.run(level(server.url, prompts[i * n:(i + 1) * n], conc, n, max_tokens, guided)).summary()
        rounds[guided].append((summary, cpu_seconds(server.proc.pid) - cpu))
    tok_s, cpu_ms, errors = {}, {}, {}
    for g, rs in rounds.items():
        tokens = sum(r["output_tokens"] for r, _ in rs)
        tok_s[g] = tokens / sum(r["wall_s"] for r, _ in rs)
        cpu_ms[g] = 1e3 * sum(c for _, c in rs) / max(tokens, 1)
        errors[g] = sum(r["errors"] for r, _ in rs)
    spread = ["/".join(f"{r['output_tok_s']:.0f}" for r, _ in rounds[g]) for g in (False, True)]
    return (f"{tok_s[False]:>10.1f} {tok_s[True]:>10.1f} {tok_s[True] / tok_s[False]:>9.2f} "
            f"{cpu_ms[False]:>15.2f} {cpu_ms[True]:>15.2f} {cpu_ms[False] / cpu_ms[True]:>13.2f}   "
            f"errors {errors[False]}/{errors[True]}; rounds free {spread[0]}, json {spread[1]} tok/s")


def embed_rate(url: str, prompts: list[str], batch: int, calls: int) -> float:
    inputs = (prompts * (batch // len(prompts) + 1))[:batch]
    with httpx.Client(timeout=600) as c:
        c.post(url + "/v1/embeddings", json={"model": "smollm2", "input": inputs[:2]}).raise_for_status()  # warm
        start = time.perf_counter()
        for _ in range(calls):
            c.post(url + "/v1/embeddings", json={"model": "smollm2", "input": inputs}).raise_for_status()
        return batch * calls / (time.perf_counter() - start)


def main() -> int:
    from gearshift.engine.bundled import bundled_model_path
    from gearshift.engine.config import usable_cpus

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="gguf,paged")
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--rounds", type=float, default=2.0, help="requests per level = max(rounds * conc, 4)")
    p.add_argument("--repeats", type=int, default=2, help="free/guided round pairs per level, in ABBA order")
    p.add_argument("--embed-batch", type=int, default=32)
    p.add_argument("--embed-calls", type=int, default=4)
    p.add_argument("--threads", type=int, default=usable_cpus())
    args = p.parse_args()
    model = str(bundled_model_path())
    levels = [int(c) for c in args.concurrency.split(",")]
    # Every row gets prompts of its own: a row reusing another's would meet them in the prefix cache.
    per_level = [max(int(args.rounds * c), 4) for c in levels]
    prompts = make_prompts(model, 2 * args.repeats * sum(per_level) + 2, args.prompt_tokens)
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f in
                    ("avx2", "avx512f", "avx512_bf16", "avx512_vnni")})
    print(f"cpu flags: {' '.join(flags)}; threads {args.threads}; {args.prompt_tokens} prompt tokens, "
          f"{args.max_tokens} output tokens, greedy, ignore_eos; thread wait {THREAD_WAIT}")
    print(f"{'engine':<7} {'conc':>4} {'free tok/s':>10} {'json tok/s':>10} {'json/free':>9} "
          f"{'free cpu ms/tok':>15} {'json cpu ms/tok':>15} {'cpu json/free':>13}")
    embeds = {}
    for engine in args.targets.split(","):
        cmd = gearshift_cmd(engine, model, free_port(), args.threads, max(levels), 2048, [])
        with started(engine, cmd, "/ready") as server:
            asyncio.run(level(server.url, prompts[-2:], 2, 2, 8, guided=True))  # warm: grammar vocab, first masks
            at = 0
            for conc, n in zip(levels, per_level, strict=True):
                row = structured_row(server, prompts[at:at + 2 * args.repeats * n], conc, n, args.max_tokens,
                                     args.repeats)
                at += 2 * args.repeats * n
                print(f"{engine:<7} {conc:>4} {row}", flush=True)
            if args.embed_calls:
                embeds[engine] = embed_rate(server.url, prompts, args.embed_batch, args.embed_calls)
    for engine, rate in embeds.items():
        print(f"embeddings {engine:<6} batch {args.embed_batch}: {rate:.1f} inputs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
