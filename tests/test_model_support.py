"""What each engine can serve: the paged engine's refusal of an unknown architecture (its exit line, which
becomes the pod's termination message), the operator's reading of it (Degraded/UnsupportedModel, the gguf
fall back under engine auto), `gearshift plan` reaching the same decision from the file, and
`hardware.count` passed to the engine as its tensor-parallel size. The local-control-plane half is in
test_operator_cluster.py's fixtures (imported below)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from gearshift.engine.model.config import UNSUPPORTED_MODEL, reported_architecture
from gearshift.operator.builders import serve_args
from gearshift.operator.policy import CROSSOVER_CONCURRENCY, decide
from gearshift.operator.spec import parse_spec
from gearshift.operator.status import compute_status, degraded_state

GEARSHIFT = str(Path(sys.executable).parent / "gearshift")
GPU = {"accelerator": "nvidia.com/gpu", "count": 1}


def isvc(uri: str, name: str = "m", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "gearshift.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": "ns"}, "spec": {"model": {"uri": uri}, **spec}}


def write_gguf(path: Path, arch: str) -> Path:
    """A tiny well-formed GGUF of `arch` (the gguf package's writer): enough for the header to be read."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def mamba_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("arch") / "tiny-mamba.gguf", "mamba")


# ---------------------------------------------------------------------------------- policy (pure)

def test_accelerator_count_becomes_the_tensor_parallel_size() -> None:
    spec = parse_spec(isvc("hf://org/repo", hardware={**GPU, "count": 4}))
    plan = decide(spec)
    assert plan.tensor_parallel == 4 and plan.requests["nvidia.com/gpu"] == "4"
    args = serve_args(spec, plan, "/models/m", "0.0.0.0", 8000)
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    one = decide(parse_spec(isvc("hf://org/repo", hardware=GPU)))
    assert one.tensor_parallel == 1 and "--tensor-parallel-size" not in serve_args(spec, one, "/m", "h", 1)


@pytest.mark.parametrize(("engine", "hardware", "want", "words"), [
    ("auto", {}, "gguf", ["does not implement architecture 'mamba'", "falling back to the gguf engine"]),
    ("auto", GPU, "paged", ["accelerator"]),  # gguf cannot take the GPU: the pod will say UnsupportedModel
    ("paged", {}, "paged", ["engine paged was requested"]),  # the user's choice stands, and fails visibly
])
def test_unsupported_architecture_falls_back_to_gguf_under_auto(engine: str, hardware: dict, want: str,
                                                                words: list[str]) -> None:
    spec = parse_spec(isvc("pvc://models/m.gguf", engine=engine, concurrency=CROSSOVER_CONCURRENCY * 4,
                           hardware=hardware))
    plan = decide(spec, unsupported_architecture="mamba")
    assert plan.engine == want
    assert all(w in plan.reason for w in words), plan.reason
    assert decide(spec).engine == "paged"  # not known: the crossover decides, as before


# ------------------------------------------------------------------------ the engine's exit line

def test_paged_engine_names_the_architecture_it_cannot_run(mamba_gguf: Path) -> None:
    r = subprocess.run([GEARSHIFT, "serve", "--engine", "paged", "--model", str(mamba_gguf), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, env={"PYTHONSAFEPATH": "1", "PATH": ""})
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"{UNSUPPORTED_MODEL}: architecture 'mamba'" in last and "Traceback" not in r.stderr
    assert reported_architecture(r.stderr) == "mamba"


# ------------------------------------------------------------------------------- status (pure)

def _pod(message: str) -> dict[str, Any]:
    term = {"exitCode": 2, "reason": "Error", "message": message}
    return {"metadata": {"name": "m-abc", "creationTimestamp": "2026-11-30T00:00:00Z"},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "engine", "ready": False, "restartCount": 3, "lastState": {"terminated": term},
                 "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}}}]}}


def test_status_degraded_unsupported_model_and_remembered() -> None:
    line = f"gearshift serve: {UNSUPPORTED_MODEL}: architecture 'mamba' is not implemented by the paged engine"
    degraded, reason, message = degraded_state([_pod("loading...\n" + line)], None)
    assert (degraded, reason) == (True, UNSUPPORTED_MODEL) and "'mamba'" in message
    spec = parse_spec(isvc("pvc://models/m.gguf"))
    st = compute_status(name="m", generation=1, spec=spec, plan=decide(spec, "mamba"), error=None, deployment=None,
                        pods=[_pod(line)], previous=None, now="t")
    assert st["unsupportedModel"] == {"uri": "pvc://models/m.gguf", "architecture": "mamba"}
    # The gguf pods that replace the paged ones say nothing: the memory in status keeps the decision.
    again = compute_status(name="m", generation=1, spec=spec, plan=decide(spec, "mamba"), error=None,
                           deployment=None, pods=[], previous=st, now="t")
    assert again["unsupportedModel"]["architecture"] == "mamba"
    other = parse_spec(isvc("pvc://models/other.gguf"))
    fresh = compute_status(name="m", generation=2, spec=other, plan=decide(other), error=None, deployment=None,
                           pods=[], previous=st, now="t")
    assert "unsupportedModel" not in fresh  # a new model is judged afresh


# ------------------------------------------------------------------------ gearshift plan / up

def test_plan_and_up_read_the_architecture_locally(mamba_gguf: Path, tmp_path: Path) -> None:
    doc = isvc(f"file://{mamba_gguf}", concurrency=CROSSOVER_CONCURRENCY * 4)
    f = tmp_path / "isvc.yaml"
    f.write_text(yaml.safe_dump(doc))
    env = {"PYTHONSAFEPATH": "1", "PATH": ""}
    r = subprocess.run([GEARSHIFT, "plan", "-f", str(f)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "engine gguf -- the paged engine does not implement architecture 'mamba'" in r.stdout
    r = subprocess.run([GEARSHIFT, "up", "-f", str(f), "--dry-run"], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 0 and "engine gguf -- the paged engine does not implement" in r.stderr
    assert " serve --engine gguf " in r.stdout
    f.write_text(yaml.safe_dump({**doc, "spec": {**doc["spec"], "engine": "paged"}}))
    r = subprocess.run([GEARSHIFT, "up", "-f", str(f), "--dry-run"], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode != 0 and "UnsupportedModel" in r.stderr and len(r.stderr.strip().splitlines()) == 1
