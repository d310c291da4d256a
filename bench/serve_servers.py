"""Server processes for bench/serve.py: ours (`gearshift serve --engine paged|gguf`) and llama.cpp's own
`llama-server`, started on a free port, waited for, sampled for resident memory, and stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (from /proc)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


@dataclass
class ServerProc:
    name: str
    proc: subprocess.Popen
    url: str
    model: str
    log: Path
    rss_idle: int = 0
    rss_peak: int = 0
    _sampling: bool = False
    _thread: threading.Thread | None = field(default=None, repr=False)

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def start_rss_sampling(self) -> None:
        self._sampling = True

        def loop() -> None:
            while self._sampling and self.proc.poll() is None:
                self.rss_peak = max(self.rss_peak, tree_rss_bytes(self.proc.pid))
                time.sleep(0.25)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._sampling = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def gearshift_cmd(engine: str, model: str, port: int, threads: int, max_seqs: int, max_model_len: int,
                  extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "gearshift.engine.cli", "serve", "--model", model, "--engine", engine,
            "--served-model-name", "smollm2", "--port", str(port), "--threads", str(threads),
            "--max-num-seqs", str(max_seqs), "--max-model-len", str(max_model_len), "--max-waiting", "1024",
            "--log-level", "warning", *extra]


def llama_server_cmd(binary: str, model: str, port: int, threads: int, slots: int, slot_ctx: int,
                     extra: list[str]) -> list[str]:
    # One slot per concurrent stream, continuous batching (llama-server's default), the same threads.
    return [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
            "-c", str(slots * slot_ctx), "-t", str(threads), "-tb", str(threads), "-a", "smollm2", *extra]


def build_llama_server() -> str:
    """The cached llama-server binary, built on first use by bench/llama_server.sh (~7 min on 2 cores)."""
    out = subprocess.run(["bash", str(ROOT / "bench" / "llama_server.sh")], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHON": sys.executable})
    return out.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def started(name: str, cmd: list[str], ready_path: str, timeout: float = 300.0) -> Iterator[ServerProc]:
    port = int(cmd[cmd.index("--port") + 1])
    log = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = ServerProc(name, proc, f"http://127.0.0.1:{port}", "smollm2", log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.url + ready_path, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout:.0f}s:\n{server.log_tail()}")
            time.sleep(0.25)
        server.rss_idle = tree_rss_bytes(proc.pid)
        server.rss_peak = server.rss_idle
        server.start_rss_sampling()
        yield server
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            log.unlink()
