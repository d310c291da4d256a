"""Where the gguf server's per-token overhead lands: the worker's time between two llama_decode calls.

bench/gguf_overhead.py compares wall-clock tok/s, which a shared VM under load turns into noise. This
measures the cause directly: llama_decode is timed (bench/gguf_gaps_hook) in a `gearshift serve --engine
gguf` process and in this process's `llama_cpp.Llama`, requests alternating as in gguf_overhead.py. The
gap between one decode's return and the next decode's start is the Python a token costs on the critical
path (sampling, and in the server the hand-off to the event loop and any wait for the GIL it holds).

    .venv/bin/python bench/gguf_decode_gaps.py --pairs 4 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import statistics
import sys
import tempfile

HOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gguf_gaps_hook")
OUT = os.environ.setdefault("GGUF_GAPS_OUT", os.path.join(tempfile.mkdtemp(prefix="gguf-gaps-"), "decode"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HOOK, os.environ.get("PYTHONPATH")) if p)  # the server
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location("gguf_gaps_hook", os.path.join(HOOK, "sitecustomize.py"))
assert _spec is not None and _spec.loader is not None
hook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hook)  # this process's llama_decode is timed the same way
from gearshift.engine.bundled import bundled_model_path  # noqa: E402
from gguf_overhead import server_request  # noqa: E402
from serve_load import in_process_request, load_in_process, make_prompts  # noqa: E402
from serve_servers import free_port, gearshift_cmd, started  # noqa: E402


def report(name: str, path: str) -> None:
    rows = [tuple(map(float, line.split())) for line in open(path) if line.strip()]
    rows = [r for r in rows if r[2] == 1 and r[0] < 1.0]  # one-token decodes, not the first of a request
    gaps = [r[0] * 1e6 for r in rows]
    q = statistics.quantiles(gaps, n=10)
    print(f"| {name} | {len(rows)} | {q[0]:.0f} / {statistics.median(gaps):.0f} / {q[-1]:.0f} | "
          f"{statistics.median(r[1] for r in rows) * 1e3:.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    model = str(bundled_model_path())
    prompts = make_prompts(model, args.pairs + 1, 128)
    with started("gguf", gearshift_cmd("gguf", model, free_port(), args.threads, 1, 1024, []), "/ready") as s:
        llm = load_in_process(model, args.threads, 1024)
        asyncio.run(server_request(s.url, prompts[-1], 8))  # warm-up, not counted
        in_process_request(llm, prompts[-1], 8)
        for f in glob.glob(OUT + ".*"):
            open(f, "w").close()
        hook._rows.clear()
        for prompt in prompts[:-1]:
            asyncio.run(server_request(s.url, prompt, args.max_tokens))
            in_process_request(llm, prompt, args.max_tokens)
        hook._rows.clear()  # this process's rows are all on file already or partial: partial ones dropped
    print("\n| llama_decode caller | decodes | gap p10 / p50 / p90 us | decode p50 ms |\n|---|---:|---|---:|")
    for f in sorted(glob.glob(OUT + ".*")):
        report("llama_cpp.Llama in-process" if f.endswith(f".{os.getpid()}") else "gearshift serve (worker)", f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
