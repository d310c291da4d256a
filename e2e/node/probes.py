"""Readiness, liveness and startup probes, run the way the kubelet runs them (httpGet, tcpSocket, exec),
against the pod's loopback address."""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
from dataclasses import dataclass, field

from gearshift.e2e.node.podspec import Launch, rewrite


def _port(value: int | str, launch: Launch) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    if value not in launch.ports:
        raise ValueError(f"probe names port {value!r} that the container does not declare")
    return launch.ports[value]


def probe_once(spec: dict, launch: Launch, pod_ip: str, mount_pairs: list[tuple[str, str]]) -> bool:
    """One attempt: True on success (HTTP 200-399, a TCP connect, exit code 0)."""
    timeout = float(spec.get("timeoutSeconds", 1))
    try:
        if "httpGet" in spec:
            g = spec["httpGet"]
            conn = http.client.HTTPConnection(g.get("host") or pod_ip, _port(g["port"], launch), timeout=timeout)
            try:
                headers = {h["name"]: h["value"] for h in g.get("httpHeaders") or []}
                conn.request("GET", g.get("path", "/"), headers=headers)
                return 200 <= conn.getresponse().status < 400
            finally:
                conn.close()
        if "tcpSocket" in spec:
            t = spec["tcpSocket"]
            with socket.create_connection((t.get("host") or pod_ip, _port(t["port"], launch)), timeout=timeout):
                return True
        if "exec" in spec:
            argv = [rewrite(a, mount_pairs, pod_ip) for a in spec["exec"]["command"]]
            return subprocess.run(argv, env=launch.env, cwd=launch.cwd, timeout=timeout,
                                  capture_output=True).returncode == 0
    except (OSError, subprocess.TimeoutExpired, http.client.HTTPException):
        return False
    return False  # a probe kind we don't run (grpc) never succeeds: honest, and visible as NotReady


@dataclass
class ProbeState:
    """Counts consecutive results against a probe's thresholds; `due()` paces it by periodSeconds."""

    spec: dict
    started_at: float
    result: bool | None = None  # None until thresholds decide
    _successes: int = 0
    _failures: int = 0
    _next: float = field(default=0.0)

    def due(self, now: float) -> bool:
        if now < self.started_at + float(self.spec.get("initialDelaySeconds", 0)):
            return False
        return now >= self._next

    def record(self, ok: bool, now: float) -> bool | None:
        """Record one attempt; returns the (possibly changed) decided result."""
        self._next = now + float(self.spec.get("periodSeconds", 10))
        if ok:
            self._successes, self._failures = self._successes + 1, 0
            if self._successes >= int(self.spec.get("successThreshold", 1)):
                self.result = True
        else:
            self._failures, self._successes = self._failures + 1, 0
            if self._failures >= int(self.spec.get("failureThreshold", 3)):
                self.result = False
        return self.result


def new_state(spec: dict | None) -> ProbeState | None:
    return ProbeState(spec=spec, started_at=time.monotonic()) if spec else None
