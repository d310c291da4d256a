"""`gearshift up` says what the server is doing while /ready is still 503: a real `up` of the real model on
the paged engine (a subprocess, a real HTTP server), its log read after /ready turns 200."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

GEARSHIFT = str(Path(sys.executable).parent / "gearshift")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail("gearshift up never became ready:\n" + log.read_text())


@pytest.mark.slow
def test_up_logs_the_load_while_ready_waits(smollm2_gguf: Path, tmp_path: Path) -> None:
    f = tmp_path / "isvc.yaml"  # 16 concurrent requests: the paged engine, which copies every weight in
    f.write_text(yaml.safe_dump({
        "apiVersion": "gearshift.dev/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "smollm2", "namespace": "team-a"},
        "spec": {"model": {"uri": f"file://{smollm2_gguf}"}, "concurrency": 16,
                 "hardware": {"cpu": "2", "memory": "2Gi"}, "engineArgs": {"maxModelLen": 256}}}))
    port, log = _free_port(), tmp_path / "up.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([GEARSHIFT, "up", "-f", str(f), "--port", str(port)], stdout=out, stderr=out,
                                start_new_session=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
        try:
            _wait_ready(proc, port, log)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    text = log.read_text()
    assert re.search(r"gearshift up: starting the paged engine on \S+ \(\d+\.\d MiB\); it answers "
                     rf"http://127\.0\.0\.1:{port}/ready once loaded", text), text
    assert "loading the model (paged engine); /ready answers 503 until it is done" in text
    steps = re.findall(r"loading weights: layer (\d+) of 30, [\d.]+M params of [\d.]+M params \((\d+)%\), "
                       r"[\d.]+ M params/s, ETA [\dhms.]+", text)
    assert len(steps) >= 2, text  # at least the 50% and 75% steps of SmolLM2's 30 layers
    assert [int(p) for _, p in steps] == sorted(int(p) for _, p in steps)  # forward only
    assert re.search(r"weights loaded: [\d.]+M params in [\dhms.]+ \([\d.]+ M params/s\)", text), text
    assert re.search(r"model loaded in [\d.]+s; /ready answers 200", text), text
    order = [text.index(s) for s in ("gearshift up: starting", "loading weights:", "weights loaded:", "model loaded in")]
    assert order == sorted(order), text
