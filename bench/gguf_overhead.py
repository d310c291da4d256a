"""What our HTTP layer costs the gguf engine (issue 5: >= 0.95x of `llama_cpp.Llama` in-process).

One `gearshift serve --engine gguf` process and one `llama_cpp.Llama` in this process, on the same GGUF, the
same threads and the same thread-wait policy. Requests alternate between the two (server, library, server,
...), each pair on the same prompt, so drift in the machine's speed (shared VMs drift by tens of percent
over minutes) lands on both sides alike. The server is driven exactly as bench/serve.py drives it: one
streamed `/v1/completions` at a time, greedy, `ignore_eos`, by the same lean client (bench/sse_client.py).

    .venv/bin/python bench/gguf_overhead.py --pairs 12

Prints per-system output tokens/s (all tokens / all request time), TTFT and TPOT medians, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys

from gearshift.engine.thread_wait import apply_thread_wait, default_policy  # noqa: E402

THREAD_WAIT = apply_thread_wait(default_policy())  # before llama_cpp loads libgomp; the server inherits it
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # siblings (PYTHONSAFEPATH=1 omits it)

from gearshift.engine.config import usable_cpus  # noqa: E402
from serve_load import RequestResult, in_process_request, load_in_process, make_prompts, one_request  # noqa: E402
from serve_servers import free_port, gearshift_cmd, started  # noqa: E402


def summarize(name: str, results: list[RequestResult]) -> dict[str, float | str]:
    tokens = sum(r.tokens for r in results)
    busy = sum(r.end - r.start for r in results)
    return {
        "system": name,
        "requests": len(results),
        "tokens": tokens,
        "tok_s": tokens / busy,
        "ttft_ms": statistics.median(r.ttft for r in results if r.ttft is not None) * 1e3,
        "tpot_ms": statistics.median(r.tpot for r in results if r.tpot is not None) * 1e3,
    }


async def server_request(url: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    results: list[RequestResult] = []
    await one_request(url, body, results, 300.0)
    if not results[0].ok:
        raise RuntimeError(f"server request failed: {results[0].error}")
    return results[0]


def alternate(url: str, model: str, prompts: list[str], max_tokens: int, threads: int, n_ctx: int
              ) -> tuple[list[RequestResult], list[RequestResult]]:
    """Server request, library request, server, ... on prompts[:-1] (prompts[-1] warms both first)."""
    llm = load_in_process(model, threads, n_ctx)
    served: list[RequestResult] = []
    library: list[RequestResult] = []
    try:
        asyncio.run(server_request(url, prompts[-1], 8))  # first-call costs are not the layer's
        in_process_request(llm, prompts[-1], 8)
        for prompt in prompts[:-1]:
            served.append(asyncio.run(server_request(url, prompt, max_tokens)))
            library.append(in_process_request(llm, prompt, max_tokens))
    finally:
        llm.close()
    return served, library


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M Q4_1)")
    p.add_argument("--pairs", type=int, default=12, help="server/library request pairs")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=usable_cpus())
    args = p.parse_args(argv)
    from gearshift.engine.bundled import bundled_model_path

    model = args.model or str(bundled_model_path())
    n_ctx = max(args.prompt_tokens + args.max_tokens + 64, 1024)
    prompts = make_prompts(model, args.pairs + 1, args.prompt_tokens)
    cmd = gearshift_cmd("gguf", model, free_port(), args.threads, 1, n_ctx, [])
    print(f"model {model}\n{args.pairs} pairs, prompt {args.prompt_tokens} tokens, output {args.max_tokens} "
          f"tokens, threads {args.threads}, thread wait {THREAD_WAIT}\nserver: {' '.join(cmd)}", flush=True)
    with started("gguf", cmd, "/ready") as server:
        served, library = alternate(server.url, model, prompts, args.max_tokens, args.threads, n_ctx)
    rows = [summarize("gearshift serve --engine gguf (HTTP, SSE)", served),
            summarize("llama_cpp.Llama in-process", library)]
    width = max(len(str(r["system"])) for r in rows)
    print(f"\n| {'system'.ljust(width)} | requests | out tok/s | TTFT p50 ms | TPOT p50 ms |")
    print(f"|{'-' * (width + 2)}|---------:|----------:|------------:|------------:|")
    for r in rows:
        print(f"| {str(r['system']).ljust(width)} | {r['requests']:>8} | {r['tok_s']:>9.1f} | {r['ttft_ms']:>11.0f} "
              f"| {r['tpot_ms']:>11.2f} |")
    ratio = float(rows[0]["tok_s"]) / float(rows[1]["tok_s"])
    print(f"\nserver / in-process output tokens/s: {ratio:.3f}x (issue 5 target >= 0.95x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
