"""Start a real `gearshift serve` process on a free port and wait for /ready (shared by the server tests)."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ENGINES = ["gguf", "paged"]


def engine_param(engine: str) -> object:
    """A pytest param for an engine; the paged one is skipped only while its engine does not import."""
    marks = []
    if engine == "paged":
        try:
            importlib.import_module("gearshift.engine.llm_engine")
        except ImportError as e:
            marks.append(pytest.mark.skip(reason=f"paged engine not importable yet: {e}"))
    else:
        try:
            importlib.import_module("llama_cpp")
        except ImportError:
            marks.append(pytest.mark.skip(reason="llama-cpp-python is not installed"))
    return pytest.param(engine, marks=marks, id=engine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from a Prometheus text page, e.g. metric(t, 'gearshift:num_requests_running')."""
    pat = re.compile(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", re.M)
    for m in pat.finditer(text):
        if labels in m.group(1):
            return float(m.group(2))
    raise AssertionError(f"{name}{{{labels}}} not in /metrics")


def wait_queued(server: Server, at_least: int = 1, timeout: float = 120) -> None:
    """Until `server`'s gearshift:num_requests_waiting reads `at_least`: a failure, never a hang, when the
    request meant to queue never does (e.g. the one ahead of it already finished)."""
    deadline = time.monotonic() + timeout
    while metric(server.metrics(), "gearshift:num_requests_waiting") < at_least:
        assert time.monotonic() < deadline, f"no {at_least} request(s) waiting after {timeout:.0f} s"
        time.sleep(0.05)


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path, model: str) -> None:
        self.proc, self.port, self.log, self.model = proc, port, log, model
        self.url = f"http://127.0.0.1:{port}"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def serve_args(model: Path, engine: str, *extra: str, name: str = "smollm2") -> list[str]:
    args = ["--model", str(model), "--engine", engine, "--served-model-name", name, "--log-level", "warning"]
    if engine == "paged":  # a small KV cache and context keep the CPU tests light
        args += ["--max-model-len", "1024", "--kv-cache-memory", "64Mi"]
    return args + list(extra)


@contextlib.contextmanager
def running_server(model: Path, engine: str, *extra: str, env: dict[str, str] | None = None,
                   timeout: float = 180.0, entry: list[str] | None = None) -> Iterator[Server]:
    """entry: what runs `gearshift serve` (default `python -m gearshift.engine.cli`)."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix=f"gearshift-{engine}-", suffix=".log")[1])
    cmd = [*(entry or [sys.executable, "-m", "gearshift.engine.cli"]), "serve", *serve_args(model, engine, *extra),
           "--port", str(port)]
    full_env = {**os.environ, "PYTHONSAFEPATH": "1", **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    server = Server(proc, port, log, "smollm2")
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after {timeout}s:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        server.terminate()
        with contextlib.suppress(OSError):
            log.unlink()
