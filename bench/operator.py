"""Operator at scale: N InferenceServices applied at once, then nothing changed for a while.

Measures, on the local control plane (or $KUBECONFIG):
  - time until every resource has its children (Deployment, Service) and a status for its generation,
  - API requests per resource (a counting proxy sits between the operator and the API server),
  - the operator's peak memory (VmHWM),
  - API writes while nothing changes for --idle-minutes (must be 0), with resyncs every --resync-seconds.
  - API writes after an operator restart over the same resources (must be 0 too).
The baseline is the same operator with --always-apply (re-apply every child on every reconcile, the
naive level-based loop), over the same resources and the same idle window; the table shows both.

    .venv/bin/python bench/operator.py                 # 300 resources, 5 idle minutes per run
    .venv/bin/python bench/operator.py --count 50 --idle-minutes 1

Each resource gets a Service, hence a cluster IP: the cluster's service range must hold --count of them
(a /24 holds 254, shared with every other test's Services).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GEARSHIFT = str(Path(sys.executable).parent / "gearshift")
API = "gearshift.dev/v1alpha1"
WRITES = ("POST", "PUT", "PATCH", "DELETE")


class CountingProxy:
    """Plain HTTP on loopback -> the API server over TLS; counts requests by verb (watches apart)."""

    def __init__(self, upstream: str, ca_file: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.ssl = ssl.create_default_context(cafile=ca_file)
        self.counts: Counter[str] = Counter()
        self.detail: Counter[str] = Counter()  # "PATCH deployments", "PATCH inferenceservices/status", ...
        self.port = 0
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def snapshot(self) -> Counter[str]:
        return Counter(self.counts)

    def _run(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        async def handle(request: web.Request) -> web.StreamResponse:
            watch = request.query.get("watch") in ("1", "true")
            verb = "WATCH" if watch else request.method
            self.counts[verb] += 1
            self.detail[f"{verb} {_resource(request.path)}"] += 1
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
            body = await request.read()
            async with session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                       data=body or None) as up:
                resp = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")})
                try:
                    await resp.prepare(request)
                    async for chunk in up.content.iter_any():  # bytes as sent (gzip stays gzip)
                        await resp.write(chunk)
                    await resp.write_eof()
                except ConnectionResetError:
                    pass  # the operator closed a watch: normal at shutdown
                return resp

        async def main() -> None:
            nonlocal session
            session = ClientSession(connector=TCPConnector(ssl=self.ssl, limit=0), timeout=ClientTimeout(total=None),
                                    auto_decompress=False)
            app = web.Application(client_max_size=64 * 2**20)
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._ready.set()
            await asyncio.Event().wait()

        session = None
        asyncio.run(main())


def _resource(path: str) -> str:
    """/apis/apps/v1/namespaces/ns/deployments/m -> deployments; .../inferenceservices/m/status -> .../status"""
    parts = path.strip("/").split("/")
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        rest = parts[parts.index("namespaces") + 2:]
    else:
        rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    return rest[0] + ("/" + rest[2] if len(rest) > 2 else "") if rest else path


def kubectl(kubeconfig: Path, *args: str, input: str | None = None) -> str:
    r = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], input=input, text=True,
                       capture_output=True, timeout=600)
    if r.returncode:
        raise SystemExit(f"kubectl {' '.join(args[:3])}: {r.stderr.strip()}")
    return r.stdout


def rss_peak_mib(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def start_operator(kubeconfig: Path, ns: str, resync: float, baseline: bool, log: Path) -> subprocess.Popen:
    args = [GEARSHIFT, "operator", "--kubeconfig", str(kubeconfig), "--namespace", ns,
            "--resync-seconds", str(resync), "--image", "gearshift:bench"]
    if baseline:
        args.append("--always-apply")
    return subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONSAFEPATH": "1"})


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def settled(admin, ns: str, count: int, generation: int) -> int:  # noqa: ANN001
    """How many resources have their Deployment, Service and a status for `generation`."""
    items = admin.request("GET", f"/apis/gearshift.dev/v1alpha1/namespaces/{ns}/inferenceservices")["items"]
    deps = {d["metadata"]["name"] for d in admin.request("GET", f"/apis/apps/v1/namespaces/{ns}/deployments")["items"]}
    svcs = {s["metadata"]["name"] for s in admin.request("GET", f"/api/v1/namespaces/{ns}/services")["items"]}
    return sum(1 for o in items if o["metadata"]["name"] in deps and o["metadata"]["name"] in svcs
               and (o.get("status") or {}).get("observedGeneration") == generation)


def run_phase(name: str, args: argparse.Namespace, kubeconfig: Path, sa_kubeconfig: Path, ns: str,
              admin, work: Path, baseline: bool, create: bool) -> dict:  # noqa: ANN001
    proxy = CountingProxy(*_server_and_ca(sa_kubeconfig))
    proxied = work / f"{name}.kubeconfig"
    cfg = yaml.safe_load(sa_kubeconfig.read_text())
    for c in cfg["clusters"]:
        c["cluster"] = {"server": f"http://127.0.0.1:{proxy.port}"}
    proxied.write_text(yaml.safe_dump(cfg))
    proc = start_operator(proxied, ns, args.resync_seconds, baseline, work / f"{name}.log")
    result: dict = {"phase": name}
    try:
        if create:
            time.sleep(3)  # the operator's watches are up
            t0 = time.monotonic()
            docs = [{"apiVersion": API, "kind": "InferenceService", "metadata": {"name": f"m{i:04d}", "namespace": ns},
                     "spec": {"model": {"uri": "https://127.0.0.1:9/m.gguf"}, "concurrency": 1 + i % 16,
                              "replicas": 1}} for i in range(args.count)]
            with ThreadPoolExecutor(16) as pool:  # "at once": as fast as the API server takes them
                list(pool.map(lambda d: admin.apply(d), docs))
            created = time.monotonic() - t0
            while settled(admin, ns, args.count, 1) < args.count:
                if time.monotonic() - t0 > args.timeout:
                    raise SystemExit(f"{name}: only {settled(admin, ns, args.count, 1)}/{args.count} settled "
                                     f"after {args.timeout}s; see {work / (name + '.log')}")
                time.sleep(1)
            result["settle_s"] = time.monotonic() - t0
            result["create_s"] = created
            result["busy"] = proxy.snapshot()
            # "Nothing changed" starts once the world is still: the controller-manager and the scheduler
            # finish with the pods (each verdict is a real change the status reports) before the window.
            result["quiet_s"] = wait_quiet(admin, ns, args.timeout)
        # A restarted operator (create=False) is counted from its first request: relisting everything
        # must cost reads only.
        before, before_detail = proxy.snapshot(), Counter(proxy.detail)
        time.sleep(args.idle_minutes * 60)
        idle = proxy.snapshot() - before
        result["idle_detail"] = Counter(proxy.detail) - before_detail
        result["idle"] = idle
        result["idle_writes"] = sum(idle[v] for v in WRITES)
        result["rss_mib"] = rss_peak_mib(proc.pid)
    finally:
        stop(proc)
    return result


def wait_quiet(admin, ns: str, timeout: float, still: float = 20.0) -> float:  # noqa: ANN001
    """Wait until no InferenceService, Deployment or Pod in `ns` has changed for `still` seconds."""
    t0 = time.monotonic()
    last, since = None, time.monotonic()
    while time.monotonic() - t0 < timeout:
        rvs = []
        for path in (f"/apis/gearshift.dev/v1alpha1/namespaces/{ns}/inferenceservices",
                     f"/apis/apps/v1/namespaces/{ns}/deployments", f"/api/v1/namespaces/{ns}/pods"):
            rvs += sorted(o["metadata"]["resourceVersion"] for o in admin.request("GET", path)["items"])
        if rvs != last:
            last, since = rvs, time.monotonic()
        elif time.monotonic() - since >= still:
            return time.monotonic() - t0
        time.sleep(2)
    raise SystemExit(f"the namespace never became still within {timeout}s")


def _server_and_ca(kubeconfig: Path) -> tuple[str, str]:
    cfg = yaml.safe_load(kubeconfig.read_text())
    cluster = cfg["clusters"][0]["cluster"]
    return cluster["server"], cluster["certificate-authority"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--idle-minutes", type=float, default=5.0)
    p.add_argument("--resync-seconds", type=float, default=30.0)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--skip-baseline", action="store_true")
    args = p.parse_args()
    # Cleanup (operator processes, the namespace) runs on Ctrl-C and on `kill` alike.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from gearshift.e2e.cluster.local import ensure_cluster
    from gearshift.e2e.cluster.operator_process import OperatorProcess
    from gearshift.operator.apply import Kube
    from kubernetes import config

    kubeconfig = ensure_cluster()
    work = REPO / ".cache" / "bench-operator" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    ns = f"gs-bench-{uuid.uuid4().hex[:6]}"
    kubectl(kubeconfig, "create", "namespace", ns)
    op = OperatorProcess(kubeconfig, REPO / "manifests", work, namespaces=[ns])
    op.install()
    kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/inferenceservices.gearshift.dev", "--timeout=60s")
    admin = Kube(config.new_client_from_config(config_file=str(kubeconfig)))
    try:
        ours = run_phase("gearshift", args, kubeconfig, op.sa_kubeconfig, ns, admin, work, False, True)
        again = run_phase("gearshift-restarted", args, kubeconfig, op.sa_kubeconfig, ns, admin, work, False, False)
        base = None if args.skip_baseline else run_phase(
            "always-apply", args, kubeconfig, op.sa_kubeconfig, ns, admin, work, True, False)
    finally:
        kubectl(kubeconfig, "delete", "namespace", ns, "--wait=false")

    busy = ours["busy"]
    n = args.count
    print(f"\n{n} InferenceServices applied at once ({ours['create_s']:.1f} s to create them); operator log in {work}")
    print("| measure | gearshift | always-apply baseline |")
    print("|---|---|---|")
    print(f"| time until all have children + status | {ours['settle_s']:.1f} s | - |")
    print(f"| API requests per resource while settling | {sum(busy.values()) / n:.2f} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(busy.items()))}) | - |")
    print(f"| time until the namespace is still (pods scheduled or refused) | +{ours['quiet_s']:.1f} s | - |")
    print(f"| writes per resource while settling | {sum(busy[v] for v in WRITES) / n:.2f} | - |")
    bw = base["idle_writes"] if base else None
    print(f"| API writes in {args.idle_minutes:g} idle min (resync every {args.resync_seconds:g} s) | "
          f"{ours['idle_writes']} | {bw if bw is not None else '-'} |")
    print(f"| API writes in {args.idle_minutes:g} min after an operator restart | {again['idle_writes']} | "
          f"{bw if bw is not None else '-'} |")
    print(f"| API requests in the idle window | {sum(ours['idle'].values())} | "
          f"{sum(base['idle'].values()) if base else '-'} |")
    print(f"| operator peak RSS | {ours['rss_mib']:.0f} MiB | {base['rss_mib'] if base else float('nan'):.0f} MiB |")
    if base:
        ratio = "inf" if ours["idle_writes"] == 0 else f"{bw / ours['idle_writes']:.1f}x"
        print(f"\nidle writes, baseline / gearshift: {bw} / {ours['idle_writes']} ({ratio})")
    for r in (ours, again, base):
        if r and r["idle_detail"]:
            print(f"{r['phase']} idle requests: " + ", ".join(f"{k} {v}" for k, v in r["idle_detail"].most_common()))
    if ours["idle_writes"] or again["idle_writes"]:
        raise SystemExit(f"FAIL: {ours['idle_writes']} + {again['idle_writes']} API writes while nothing changed")


if __name__ == "__main__":
    main()
