"""`gearshift plan` and `gearshift up` as a user runs them: real subprocesses, a real server (for `up`, the
real model: its answers, and what it logs while /ready is still 503)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GEARSHIFT = str(Path(sys.executable).parent / "gearshift")


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([GEARSHIFT, *args], capture_output=True, text=True, input=stdin, timeout=120)


def isvc_yaml(uri: str, **spec: object) -> str:
    return yaml.safe_dump({"apiVersion": "gearshift.dev/v1alpha1", "kind": "InferenceService",
                           "metadata": {"name": "smollm2", "namespace": "team-a"},
                           "spec": {"model": {"uri": uri}, **spec}})


def test_plan_prints_decision_and_manifests() -> None:
    r = run("plan", "-f", "-", stdin=isvc_yaml("https://h.example/m.gguf", concurrency=3, replicas=2))
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first == "# team-a/smollm2: engine gguf -- 3 concurrent requests on CPU: below the paged engine's crossover (4)"
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert [d["kind"] for d in docs] == ["Service", "Deployment", "PodDisruptionBudget"]
    assert docs[1]["spec"]["template"]["spec"]["initContainers"][0]["args"][:2] == ["fetch", "https://h.example/m.gguf"]


def test_plan_examples() -> None:
    cpu = run("plan", "-f", str(REPO / "examples" / "cpu-single-user.yaml"))
    assert cpu.returncode == 0 and "engine gguf" in cpu.stdout.splitlines()[0]
    gpu = run("plan", "-f", str(REPO / "examples" / "gpu-many-users.yaml"), "--hpa-version", "autoscaling/v2beta2")
    assert gpu.returncode == 0 and "engine paged" in gpu.stdout.splitlines()[0]
    kinds = [d["kind"] for d in yaml.safe_load_all(gpu.stdout) if d]
    assert kinds == ["PersistentVolumeClaim", "Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"]


@pytest.mark.parametrize(("text", "words"), [
    (isvc_yaml("https://h.example/m.safetensors", engine="gguf"), "spec.engine: gguf needs a .gguf model file"),
    (isvc_yaml("ftp://h/m.gguf"), "spec.model.uri"),
    ("kind: Deployment\n", "holds no InferenceService"),
    ("a: [unclosed\n", "is not valid YAML"),
])
def test_plan_bad_input_is_one_line(text: str, words: str) -> None:
    r = run("plan", "-f", "-", stdin=text)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert words in r.stderr


def test_plan_missing_file() -> None:
    r = run("plan", "-f", "/nonexistent/isvc.yaml")
    assert r.returncode == 2 and "cannot read /nonexistent/isvc.yaml" in r.stderr


def test_up_dry_run_gives_the_pods_command(tmp_path: Path) -> None:
    f = tmp_path / "isvc.yaml"
    f.write_text(isvc_yaml("file:///srv/m.gguf", concurrency=16, hardware={"cpu": "2", "memory": "2Gi"}))
    r = run("up", "-f", str(f), "--dry-run", "--port", "9999")
    assert r.returncode == 0, r.stderr
    assert "engine paged" in r.stderr
    assert r.stdout.split()[:4] == ["gearshift", "serve", "--engine", "paged"]
    assert "--port 9999" in r.stdout and "--model /srv/m.gguf" in r.stdout


def test_up_refuses_a_pvc_model(tmp_path: Path) -> None:
    f = tmp_path / "isvc.yaml"
    f.write_text(isvc_yaml("pvc://models/m.gguf"))
    r = run("up", "-f", str(f))
    assert r.returncode == 2 and "pvc:// models exist in a cluster only" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _up(isvc: Path, log: Path, ready_within: float) -> Iterator[int]:
    """`gearshift up -f isvc` as a subprocess, its output in `log`; yields its port once /ready is 200."""
    port = _free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([GEARSHIFT, "up", "-f", str(isvc), "--port", str(port)], stdout=out, stderr=out,
                                start_new_session=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
        try:
            deadline = time.monotonic() + ready_within
            while time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            else:
                pytest.fail("gearshift up never became ready:\n" + log.read_text())
            yield port
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


@pytest.mark.slow
def test_up_serves_the_decision_locally(smollm2_gguf: Path, tmp_path: Path) -> None:
    from openai import OpenAI

    f = tmp_path / "isvc.yaml"
    f.write_text(isvc_yaml(f"file://{smollm2_gguf}", concurrency=1, hardware={"cpu": "1", "memory": "1Gi"},
                           engineArgs={"maxModelLen": 512}))
    log = tmp_path / "up.log"
    with _up(f, log, ready_within=180) as port:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        out = client.chat.completions.create(model="smollm2", max_tokens=8, temperature=0,
                                             messages=[{"role": "user", "content": "Say hello."}])
        assert out.choices[0].message.content
        assert out.model == "smollm2"
        assert "engine gguf -- 1 concurrent request on CPU" in log.read_text()


@pytest.mark.slow
def test_up_logs_the_load_while_ready_waits(smollm2_gguf: Path, tmp_path: Path) -> None:
    """What `up` says while /ready is still 503, read from its log after /ready turns 200."""
    f = tmp_path / "isvc.yaml"  # 16 concurrent requests: the paged engine, which copies every weight in
    f.write_text(isvc_yaml(f"file://{smollm2_gguf}", concurrency=16, hardware={"cpu": "2", "memory": "2Gi"},
                           engineArgs={"maxModelLen": 256}))
    log = tmp_path / "up.log"
    with _up(f, log, ready_within=300) as port:
        pass
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
