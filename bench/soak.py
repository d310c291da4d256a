"""Soak: many concurrent streams against a real `gearshift serve` per engine, some clients hanging up
mid-stream and some sending bad requests, for a fixed time. Prints one table row per engine:

  good requests, 5xx among them, good streams that did not end with [DONE] (Ollama: done=true),
  disconnects, bad requests and their statuses, 429s, KV blocks still in use once idle (from /metrics),
  server RSS after warm-up and at the end.

The issue's full size: python bench/soak.py --engine both --concurrency 256 --duration 600
A quick run:          nice -n 10 python bench/soak.py --engine both --concurrency 32 --duration 120

Every good request must end: a 5xx or a stream without its terminator is a failure of the server, a 429
is back-pressure (counted apart). Exit status 1 if any good request failed or any KV block leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BAD_BODIES: list[tuple[str, bytes]] = [  # (path, body): each must get a 4xx
    ("/v1/completions", b'{"model": "smollm2", "prompt": "hi", "seed": 18446744073709551616}'),
    ("/v1/completions", b'{"model": "smollm2", "prompt": "\\ud800", "max_tokens": 4}'),
    ("/v1/chat/completions", b'{"model": "smollm2", "messages": [{"role": "user", "content": "a\\udfff"}]}'),
    ("/v1/completions", b'{"model": "smollm2", "prompt": "hi", "top_k": 1099511627776}'),
    ("/v1/completions", b'{"model": "smollm2", "prompt": "hi", "max_tokens": "ten"}'),
    ("/v1/chat/completions", b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}'),
    ("/v1/completions", b'{"model": "nope", "prompt": "hi"}'),
    ("/api/generate", b'{"model": "smollm2", "prompt": "\\ud83d", "stream": false}'),
    ("/api/chat", b'{"model": "smollm2", "messages": [{"role": "user", "content": 5}]}'),
    ("/v1/completions", b"[" * 50_000 + b"]" * 50_000),
    ("/v1/completions", b'{"model": "smollm2", "prompt": "\xff\xfe"}'),
]


@dataclass
class Tally:
    good: int = 0
    good_5xx: int = 0
    good_429: int = 0
    good_other: int = 0  # any other non-200 on a good request
    no_done: int = 0  # a 200 stream that ended without its terminator
    disconnects: int = 0
    bad: int = 0
    bad_status: dict[int, int] = field(default_factory=dict)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)  # the first few failures of each kind, for the log
    kinds: dict[str, int] = field(default_factory=dict)
    rss_samples: list[float] = field(default_factory=list)  # MiB, during the run

    def fail(self, what: str) -> None:
        kind = what.split(" ", 3)[2] if what.startswith("/") else what.split("(", 1)[0]
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if self.kinds[kind] <= 3:
            self.errors.append(what)


def good_request(rng: random.Random, max_tokens: int) -> tuple[str, dict, str]:
    """(path, body, kind): an OpenAI completion, chat, or an Ollama chat, all streamed."""
    kind = rng.choice(["completion", "chat", "ollama"])
    words = " ".join(rng.choice(["sea", "light", "storm", "keeper", "night", "ship"]) for _ in range(rng.randint(3, 30)))
    if kind == "completion":
        return "/v1/completions", {"model": "smollm2", "prompt": f"A story: {words}", "max_tokens": max_tokens,
                                   "stream": True, "temperature": 0.8}, kind
    if kind == "chat":
        return "/v1/chat/completions", {"model": "smollm2", "max_tokens": max_tokens, "stream": True,
                                        "messages": [{"role": "user", "content": f"Tell me about {words}"}]}, kind
    return "/api/chat", {"model": "smollm2", "options": {"num_predict": max_tokens},
                         "messages": [{"role": "user", "content": f"Tell me about {words}"}]}, kind


def ended(kind: str, lines: list[str]) -> bool:
    if kind == "ollama":
        last = json.loads(lines[-1]) if lines else {}
        return bool(last.get("done")) and "error" not in last
    data = [x[6:] for x in lines if x.startswith("data: ")]
    if not data or data[-1] != "[DONE]":
        return False
    # An error event is an object with an "error" key (a token whose text is "error" is not one).
    return not any("error" in json.loads(x) for x in data[:-1])


async def one_good(http: httpx.AsyncClient, rng: random.Random, t: Tally, max_tokens: int, hang_up: bool) -> None:
    path, body, kind = good_request(rng, max_tokens)
    lines: list[str] = []
    t.good += 1
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            if r.status_code == 429:  # back-pressure: wait as told, as the official clients do
                t.good_429 += 1
                await asyncio.sleep(min(float(r.headers.get("retry-after", "1") or 1), 10.0))
            elif r.status_code >= 500:
                t.good_5xx += 1
                t.fail(f"{path} -> {r.status_code} {r.text[:200]}")
            else:
                t.good_other += 1
                t.fail(f"{path} -> {r.status_code} {r.text[:200]}")
            return
        keep = rng.randint(1, 4)
        async for line in r.aiter_lines():
            if line.strip():
                lines.append(line)
            if hang_up and len(lines) >= keep:
                t.disconnects += 1
                return  # leaving the block closes the connection mid-stream
    t.tokens += len(lines)
    if not ended(kind, lines):
        t.no_done += 1
        t.fail(f"{path} ended without its terminator: {lines[-2:]}")


async def one_bad(http: httpx.AsyncClient, rng: random.Random, t: Tally) -> None:
    path, raw = rng.choice(BAD_BODIES)
    r = await http.post(path, content=raw, headers={"content-type": "application/json"})
    t.bad += 1
    t.bad_status[r.status_code] = t.bad_status.get(r.status_code, 0) + 1
    if not 400 <= r.status_code < 500:
        t.fail(f"bad {path} -> {r.status_code} {r.text[:200]}")


async def client(url: str, seed: int, deadline: float, args: argparse.Namespace, t: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=60)) as http:
        while time.monotonic() < deadline:
            roll = rng.random()
            try:
                if roll < args.bad_rate:
                    await one_bad(http, rng, t)
                else:
                    await one_good(http, rng, t, args.max_tokens, hang_up=roll < args.bad_rate + args.disconnect_rate)
            except httpx.HTTPError as e:  # the connection itself failed: counts against the server
                t.good_5xx += 1
                t.fail(f"transport: {e!r}")


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def idle_metrics(url: str, timeout: float = 120) -> str:
    """/metrics once nothing runs or waits (aborted requests free their blocks at the next step)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        deadline = time.monotonic() + timeout
        while True:
            text = (await http.get("/metrics")).text
            busy = metric(text, "gearshift:num_requests_running") + metric(text, "gearshift:num_requests_waiting")
            if busy == 0 or time.monotonic() > deadline:
                return text
            await asyncio.sleep(0.5)


async def load(url: str, args: argparse.Namespace, seconds: float, t: Tally, pid: int | None = None) -> None:
    deadline = time.monotonic() + seconds
    clients = asyncio.gather(*(client(url, i, deadline, args, t) for i in range(args.concurrency)))
    if pid is not None:  # RSS at each tenth of the run: a plateau is warm-up, a steady climb a leak
        async def sample() -> None:
            for _ in range(10):
                await asyncio.sleep(seconds / 10)
                t.rss_samples.append(rss_mib(pid))
        await asyncio.gather(clients, sample())
    else:
        await clients


@contextlib.contextmanager
def server(model: str, engine: str, args: argparse.Namespace):
    port = int(args.port) if args.port else _free_port()
    log = Path(tempfile.mkstemp(prefix=f"soak-{engine}-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "gearshift.engine.cli", "serve", "--model", model, "--engine", engine,
           "--served-model-name", "smollm2", "--port", str(port), "--log-level", "warning",
           *(["--max-waiting", str(args.max_waiting)] if args.max_waiting else []), *args.serve_arg]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONSAFEPATH": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{engine} server exited:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{engine} server not ready:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, proc, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def soak(model: str, engine: str, args: argparse.Namespace) -> dict:
    with server(model, engine, args) as (url, proc, log):
        warm = Tally()
        asyncio.run(load(url, args, args.warmup, warm))  # allocator and caches reach their working size
        asyncio.run(idle_metrics(url))
        rss_start = rss_mib(proc.pid)
        t = Tally()
        started = time.monotonic()
        asyncio.run(load(url, args, args.duration, t, proc.pid))
        elapsed = time.monotonic() - started
        text = asyncio.run(idle_metrics(url))
        rss_end = rss_mib(proc.pid)
        alive = proc.poll() is None
        leaked = metric(text, "gearshift:kv_cache_total_blocks") - metric(text, "gearshift:kv_cache_free_blocks")
        if t.errors:
            print(f"[{engine}] first failures:\n  " + "\n  ".join(t.errors), file=sys.stderr)
        return {"engine": engine, "good": t.good, "good_5xx": t.good_5xx, "good_other": t.good_other,
                "no_done": t.no_done, "429": t.good_429, "disconnects": t.disconnects, "bad": t.bad,
                "bad_status": dict(sorted(t.bad_status.items())), "leaked_blocks": leaked,
                "total_blocks": metric(text, "gearshift:kv_cache_total_blocks"),
                "rss_start_mib": rss_start, "rss_end_mib": rss_end, "rss_samples_mib": t.rss_samples,
                "alive": alive, "seconds": elapsed,
                "lines_per_s": t.tokens / elapsed if elapsed else 0.0}


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = set(flags.split(":", 1)[1].split())
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni") if f in have) or "none of avx2/avx512"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["paged", "gguf", "both"], default="both")
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2 GGUF")
    p.add_argument("--concurrency", type=int, default=256, help="concurrent clients (each one stream at a time)")
    p.add_argument("--duration", type=float, default=600, help="seconds of load per engine, after warm-up")
    p.add_argument("--warmup", type=float, default=30, help="seconds of the same load before RSS is first read")
    p.add_argument("--disconnect-rate", type=float, default=0.10, help="share of requests that hang up mid-stream")
    p.add_argument("--bad-rate", type=float, default=0.05, help="share of requests that are invalid")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--port", default=None)
    p.add_argument("--max-waiting", type=int, default=None,
                   help="the server's queue bound (default: its own); beyond it requests get 429 and wait")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `gearshift serve` argument (repeat)")
    args = p.parse_args()
    model = args.model
    if model is None:
        from gearshift.engine.bundled import bundled_model_path

        model = str(bundled_model_path())
    engines = ["gguf", "paged"] if args.engine == "both" else [args.engine]
    rows = [soak(model, e, args) for e in engines]
    print(f"\nsoak: {args.concurrency} clients x {args.duration:g} s per engine (+{args.warmup:g} s warm-up), "
          f"{args.disconnect_rate:.0%} hang up mid-stream, {args.bad_rate:.0%} bad requests, max_tokens "
          f"{args.max_tokens}; CPU flags: {cpu_flags()}; {os.cpu_count()} CPUs")
    head = ("engine", "good", "5xx", "other", "no [DONE]", "429", "hung up", "bad (statuses)", "KV leaked",
            "RSS start MiB", "RSS end MiB")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    failed = False
    for r in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in r["bad_status"].items())
        print(f"| {r['engine']} | {r['good']} | {r['good_5xx']} | {r['good_other']} | {r['no_done']} | {r['429']} | "
              f"{r['disconnects']} | {r['bad']} ({statuses}) | {r['leaked_blocks']:g} of {r['total_blocks']:g} | "
              f"{r['rss_start_mib']:.0f} | "
              f"{r['rss_end_mib']:.0f} |")
        failed |= bool(r["good_5xx"] or r["good_other"] or r["no_done"] or r["leaked_blocks"] or not r["alive"]
                       or any(not 400 <= s < 500 for s in r["bad_status"]))
    for r in rows:
        print(f"{r['engine']} RSS MiB at each tenth of the run: " + " ".join(f"{x:.0f}" for x in r["rss_samples_mib"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
