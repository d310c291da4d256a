"""A real Prometheus (Debian's `prometheus` 2.42) beside the e2e cluster, scraping model pods with the
users' own job from manifests/monitoring/prometheus-scrape.yaml and evaluating manifests/monitoring/
rules.yaml.

Debian builds Prometheus without Kubernetes service discovery (`kubernetes_sd_configs` is an unknown field
there), so this module discovers pods itself from the real API server and serves them to Prometheus through
its HTTP service discovery with the exact `__meta_kubernetes_pod_*` labels the pod role produces. Everything
after discovery — the relabelling that keeps annotated gearshift pods and names the `namespace`,
`inferenceservice`, `engine` and `pod` labels, the scrape, the rules — is the users' file, unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

MONITORING = Path(__file__).resolve().parents[2] / "manifests" / "monitoring"


def _sanitize(name: str) -> str:
    """Prometheus's label-name sanitising for meta labels (any character outside [a-zA-Z0-9_] -> _)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets Kubernetes SD's pod role makes for one pod (a dict as the API returns it): one per
    declared container port, or one bare pod-IP target when no container declares a port."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    ip = status.get("podIP")
    if not ip:
        return []
    base = {"__meta_kubernetes_namespace": meta["namespace"], "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_ip": ip, "__meta_kubernetes_pod_phase": status.get("phase", ""),
            "__meta_kubernetes_pod_node_name": spec.get("nodeName", "")}
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])
    base["__meta_kubernetes_pod_ready"] = str(ready).lower()
    for k, v in (meta.get("labels") or {}).items():
        base[f"__meta_kubernetes_pod_label_{_sanitize(k)}"] = v
        base[f"__meta_kubernetes_pod_labelpresent_{_sanitize(k)}"] = "true"
    for k, v in (meta.get("annotations") or {}).items():
        base[f"__meta_kubernetes_pod_annotation_{_sanitize(k)}"] = v
        base[f"__meta_kubernetes_pod_annotationpresent_{_sanitize(k)}"] = "true"
    out = []
    for c in spec.get("containers") or []:
        for port in c.get("ports") or []:
            labels = {**base, "__meta_kubernetes_pod_container_name": c["name"],
                      "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                      "__meta_kubernetes_pod_container_port_name": port.get("name", "")}
            out.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": labels})
    return out or [{"targets": [ip], "labels": base}]


class PodDiscovery:
    """Serves the cluster's pods as Prometheus HTTP SD on 127.0.0.1, read from the API server on each poll."""

    def __init__(self, api_client: Any) -> None:
        self.api = api_client
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/pods"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def targets(self) -> list[dict[str, Any]]:
        from kubernetes import client

        pods = client.CoreV1Api(self.api).list_pod_for_all_namespaces(_preload_content=False)
        return [t for p in json.loads(pods.data)["items"] for t in pod_targets(p)]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        discovery = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = json.dumps(discovery.targets()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def close(self) -> None:
        self.server.shutdown()


def config(sd_url: str, interval_s: int = 2) -> dict[str, Any]:
    """The users' scrape job with its Kubernetes SD swapped for our HTTP SD; everything else unchanged."""
    jobs = yaml.safe_load((MONITORING / "prometheus-scrape.yaml").read_text())
    for job in jobs:
        job.pop("kubernetes_sd_configs")
        job["http_sd_configs"] = [{"url": sd_url, "refresh_interval": f"{interval_s}s"}]
        job["scrape_interval"] = f"{interval_s}s"
    return {"global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
            "rule_files": [str(MONITORING / "rules.yaml")], "scrape_configs": jobs}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """`prometheus` as a child process with its own data dir; `query()` is its HTTP API."""

    def __init__(self, api_client: Any, work_dir: Path) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            raise RuntimeError("prometheus is missing: `make test` installs Debian's prometheus package")
        self.discovery = PodDiscovery(api_client)
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "prometheus.yml").write_text(yaml.safe_dump(config(self.discovery.url)))
        self.log = work_dir / "prometheus.log"
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [exe, f"--config.file={work_dir / 'prometheus.yml'}", f"--storage.tsdb.path={work_dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"prometheus not ready in {timeout_s}s: {self.log.read_text()[-2000:]}")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{metric: {...}, value: [t, "v"]}]."""
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, timeout_s: float = 120,
                 until: Callable[[list[dict[str, Any]]], bool] = bool) -> list[dict[str, Any]]:
        """Poll until the query's result satisfies `until` (by default: at least one series), as scrapes of
        new pods and rule evaluations take a few intervals; raises with the result and the targets' state
        when it never does."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if until(result):
                return result
            if time.monotonic() > deadline:
                targets = self.api("targets")["activeTargets"]
                raise AssertionError(f"{expr} gave {result} for {timeout_s}s; targets: "
                                     + json.dumps([(t["labels"], t["health"], t["lastError"]) for t in targets]))
            time.sleep(2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.discovery.close()
