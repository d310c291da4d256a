"""Gear shifting under a ramp: 1 -> 16 -> 1 concurrent streams against an `auto` InferenceService
(gearShift auto) and against fixed gguf and fixed paged ones, on a cluster with a node and the operator
running (the e2e setup: `make e2e` leaves them up, or any cluster in $KUBECONFIG).

Each resource gets the same ramp in turn (one at a time: they share the node's CPUs), closed-loop streamed
/v1/completions through its Service's ClusterIP (bench/serve_load.py's client): distinct 128-token prompts,
128 output tokens with ignore_eos. Per phase: output tokens served, p50/p99 TTFT, failed requests, and for
`auto` the engines that served it. Target (issue 17): auto within 10% of the better fixed engine in each
phase, zero failures.

    .venv/bin/python bench/gear.py --model-uri http://10.43.0.1:PORT/SmolLM2-135M-Instruct.Q4_1.gguf
    .venv/bin/python bench/gear.py --model-uri ... --phases 1:120,16:300,1:300 --window 60s --cooldown 60s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import make_prompts, run_level  # noqa: E402

GROUP, VERSION, PLURAL, NAME_PORT = "gearshift.dev", "v1alpha1", "inferenceservices", 8000
MODEL = "smollm2"


def resource(name: str, uri: str, engine: str, window: str, cooldown: str,
             pod_template: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"uri": uri, "servedName": MODEL}, "concurrency": 1,
                            "hardware": {"cpu": "1", "memory": "3Gi"}, "engineArgs": {"maxModelLen": 512}}
    if pod_template:
        spec["podTemplate"] = pod_template
    if engine == "auto":
        spec["gearShift"] = {"mode": "auto", "window": window, "cooldown": cooldown}
    else:
        spec["engine"] = engine
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
            "metadata": {"name": name}, "spec": spec}


class Cluster:
    def __init__(self, kubeconfig: str, ns: str) -> None:
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=kubeconfig)
        self.ns, self.core, self.custom = ns, client.CoreV1Api(api), client.CustomObjectsApi(api)

    def status(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name).get("status") or {}

    def ready(self, name: str) -> bool:
        conds = {c["type"]: c["status"] for c in self.status(name).get("conditions") or []}
        return conds.get("Ready") == "True" and conds.get("Progressing") == "False"

    def wait_ready(self, name: str, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready(name):
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} not Ready after {timeout:.0f}s: {self.status(name)}")
            time.sleep(3)

    def url(self, name: str) -> str:
        return f"http://{self.core.read_namespaced_service(name, self.ns).spec.cluster_ip}:{NAME_PORT}"

    def ready_ips(self, name: str) -> list[str]:
        pods = self.core.list_namespaced_pod(self.ns, label_selector=f"app.kubernetes.io/instance={name}").items
        return [p.status.pod_ip for p in pods if not p.metadata.deletion_timestamp and any(
            c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]


class PodRouter:
    """For a cluster without kube-proxy (the e2e stand-in node): a loopback TCP proxy that sends each new
    connection to a ready, non-terminating pod of the resource, as kube-proxy does for a ClusterIP."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster, self.name, self.server = cluster, name, None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_: object) -> None:
        self.server.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import random

        ips = await asyncio.to_thread(self.cluster.ready_ips, self.name)
        try:
            up_r, up_w = await asyncio.open_connection(random.choice(ips), NAME_PORT)
        except (OSError, IndexError):
            writer.close()
            return

        async def copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()

        await asyncio.gather(copy(reader, up_w), copy(up_r, writer))


Timeline = list[dict[str, Any]]  # bench/plot.py gear: {t, concurrency, output_tok_s, engine} per interval
INTERVAL_S = 5.0


async def ramp(cluster: Cluster, name: str, prompts: list[str], phases: list[tuple[int, float]],
               max_tokens: int, route_pods: bool = False) -> tuple[list[dict[str, Any]], Timeline]:
    if route_pods:
        async with PodRouter(cluster, name) as url:
            return await _ramp(cluster, name, url, prompts, phases, max_tokens)
    return await _ramp(cluster, name, cluster.url(name), prompts, phases, max_tokens)


def bin_tokens(chunk_times: list[float], start: float, seconds: float, streams: int, t_offset: float,
               engine_at: list[tuple[float, str]]) -> Timeline:
    """One phase's streamed chunks (perf_counter times) as tokens/s per INTERVAL_S, with the engine the
    resource's status named at the end of each interval (engine_at: (time, engine) samples)."""
    n = max(1, int(seconds // INTERVAL_S))
    counts = [0] * n
    for c in chunk_times:
        b = int((c - start) // INTERVAL_S)
        if 0 <= b < n:
            counts[b] += 1
    out = []
    for b, count in enumerate(counts):
        end = start + (b + 1) * INTERVAL_S
        engine = next((e for t, e in reversed(engine_at) if t <= end), engine_at[0][1] if engine_at else "?")
        out.append({"t": t_offset + b * INTERVAL_S, "concurrency": streams,
                    "output_tok_s": count / INTERVAL_S, "engine": engine})
    return out


async def _ramp(cluster: Cluster, name: str, url: str, prompts: list[str], phases: list[tuple[int, float]],
                max_tokens: int) -> tuple[list[dict[str, Any]], Timeline]:
    rows: list[dict[str, Any]] = []
    timeline: Timeline = []
    t_offset = 0.0
    for i, (streams, seconds) in enumerate(phases):
        engine_at: list[tuple[float, str]] = []

        async def watch(engine_at: list[tuple[float, str]] = engine_at) -> None:  # engine(s) this phase
            while True:
                engine = await asyncio.to_thread(lambda: cluster.status(name).get("engine", "?"))
                engine_at.append((time.perf_counter(), engine))
                await asyncio.sleep(INTERVAL_S)

        watcher = asyncio.create_task(watch())
        start = time.perf_counter()
        result = await run_level(url, MODEL, prompts, streams, 10**9, max_tokens, True, 600.0,
                                 duration=seconds)
        watcher.cancel()
        timeline += bin_tokens([c for r in result.requests for c in r.chunk_times], start, seconds, streams,
                               t_offset, engine_at)
        t_offset += seconds
        engines = {e for _, e in engine_at}
        s = result.summary()
        rows.append({"phase": f"{i + 1}: {streams} streams, {seconds:.0f}s", "tokens": s["output_tokens"],
                     "tok_s": s["output_tok_s"], "ttft_p50": s["ttft_p50_ms"], "ttft_p99": s["ttft_p99_ms"],
                     "failed": s["errors"], "engines": "+".join(sorted(engines))})
    return rows, timeline


def run_bench(cluster: Cluster, model_uri: str, targets: list[str], phases: list[tuple[int, float]],
              window: str, cooldown: str, max_tokens: int, route_pods: bool = False,
              pod_template: dict[str, Any] | None = None,
              timeline: Timeline | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Each target in turn: create it, wait until Ready, run the ramp, delete it. `timeline` (when given)
    gets every target's samples, tagged with the target."""
    from gearshift.engine.bundled import bundled_model_path

    prompts = make_prompts(str(bundled_model_path()), 64, 128)
    table: list[tuple[str, dict[str, Any]]] = []
    for target in targets:
        name = f"gear-{target}"
        body = resource(name, model_uri, target, window, cooldown, pod_template)
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.ns, PLURAL, body)
        cluster.wait_ready(name)
        rows, samples = asyncio.run(ramp(cluster, name, prompts, phases, max_tokens, route_pods))
        table += [(target, r) for r in rows]
        if timeline is not None:
            timeline += [{"target": target, **x} for x in samples]
        cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.ns, PLURAL, name)
    return table


def print_table(table: list[tuple[str, dict[str, Any]]], phases: list[tuple[int, float]]) -> str:
    cpuinfo = open("/proc/cpuinfo").read()
    lines = [f"{cpuinfo.count('processor')} CPUs; flags: "
             + " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni") if f" {f}" in cpuinfo),
             "| resource | phase | engine(s) | output tokens | tok/s | TTFT p50 ms | TTFT p99 ms | failed |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for target, r in table:
        lines.append(f"| {target} | {r['phase']} | {r['engines']} | {r['tokens']} | {r['tok_s']:.1f} | "
                     f"{r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} | {r['failed']} |")
    for i in range(len(phases)):
        by = {t: r for t, r in table if r["phase"].startswith(f"{i + 1}:")}
        fixed = [by[t]["tokens"] for t in ("gguf", "paged") if t in by]
        if "auto" in by and fixed and max(fixed):
            lines.append(f"phase {i + 1}: auto / better fixed engine = {by['auto']['tokens'] / max(fixed):.2f}x tokens")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--model-uri", required=True, help="a URI of the SmolLM2 GGUF the pods can fetch")
    p.add_argument("--phases", default="1:120,16:300,1:300", help="streams:seconds,...")
    p.add_argument("--targets", default="auto,gguf,paged")
    p.add_argument("--window", default="60s")
    p.add_argument("--cooldown", default="60s")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--namespace", help="an existing namespace the operator watches (default: a new one)")
    p.add_argument("--route-pods", action="store_true",
                   help="no kube-proxy (the e2e stand-in node): route each connection to a ready pod")
    p.add_argument("--pod-template", type=json.loads, default=None, help="spec.podTemplate as JSON")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the table and the timeline here (bench/plot.py gear draws it)")
    args = p.parse_args()
    if not args.kubeconfig:
        from gearshift.e2e.cluster.local import ensure_cluster

        args.kubeconfig = str(ensure_cluster())
    from kubernetes import client, config

    phases = [(int(a), float(b)) for a, b in (x.split(":") for x in args.phases.split(","))]
    ns = args.namespace or f"gear-bench-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(config.new_client_from_config(config_file=args.kubeconfig))
    if not args.namespace:
        core.create_namespace({"metadata": {"name": ns}})
    timeline: Timeline = []
    try:
        table = run_bench(Cluster(args.kubeconfig, ns), args.model_uri, args.targets.split(","), phases,
                          args.window, args.cooldown, args.max_tokens, args.route_pods, args.pod_template,
                          timeline)
    finally:
        if not args.namespace:
            core.delete_namespace(ns)
    print_table(table, phases)
    if args.json:
        args.json.write_text(json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "interval_s": INTERVAL_S,
            "args": {k: str(v) for k, v in vars(args).items()},
            "table": [{"target": t, **r} for t, r in table], "samples": timeline}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
