"""Fixtures for the end-to-end scenarios: the control plane, the test node, a model file server, the
operator installed from manifests/, and a namespace per test module. A failing test gets the operator's,
the node agent's and every pod container's log tails attached to its report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gearshift.e2e.cluster.local import REPO, ensure_cluster
from gearshift.e2e.cluster.wait import wait_for

RUN_DIR = REPO / ".cache" / "e2e" / time.strftime("%Y%m%d-%H%M%S")
KEEP_RUNS = 3  # earlier runs' directories (logs, pod volumes) are pruned beyond this
_LOGS: list[Path] = []  # files whose tails a failing test's report shows
_POD_ROOTS: list[Path] = []


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({e})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed or "e2e" not in item.keywords:
        return
    for path in _LOGS:
        rep.sections.append((f"log {path.name}", _tail(path)))
    for root in _POD_ROOTS:
        for log in sorted(root.glob("pods/*/logs/*.log"), key=lambda p: p.stat().st_mtime)[-6:]:
            rep.sections.append((f"pod {log.parent.parent.name} container {log.stem}", _tail(log)))


@pytest.fixture(scope="session")
def kubeconfig() -> Path:
    runs = sorted(p for p in RUN_DIR.parent.glob("2*") if p.is_dir() and p != RUN_DIR)
    for old in runs[:-KEEP_RUNS]:
        shutil.rmtree(old, ignore_errors=True)
    return ensure_cluster()


@pytest.fixture(scope="session")
def api(kubeconfig: Path):
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture(scope="session")
def node(kubeconfig: Path, api) -> Iterator[dict[str, Any]]:
    """The test node agent as a process; yields {name, root, log}."""
    from kubernetes import client

    name = f"e2e-{os.getpid()}"
    root = RUN_DIR / "node"
    root.mkdir(parents=True, exist_ok=True)
    log = RUN_DIR / "node-agent.log"
    _LOGS.append(log)
    _POD_ROOTS.append(root)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gearshift.e2e.node", "--kubeconfig", str(kubeconfig),
                                 "--name", name, "--root", str(root)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONSAFEPATH": "1"})
    core = client.CoreV1Api(api)

    def ready() -> bool:
        assert proc.poll() is None, f"node agent exited ({proc.returncode}): {_tail(log)}"
        conds = core.read_node(name).status.conditions or []
        return any(c.type == "Ready" and c.status == "True" for c in conds)

    wait_for(ready, 60, f"node {name} Ready")
    yield {"name": name, "root": root, "log": log}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def model_url() -> Iterator[Callable[[str], str]]:
    """http://127.0.0.1:PORT/<name> for files next to the bundled SmolLM2 GGUF (the real one)."""
    from gearshift.e2e.cluster.model_server import ModelServer
    from gearshift.engine.bundled import bundled_model_path

    gguf = bundled_model_path()
    served = RUN_DIR / "models"
    served.mkdir(parents=True, exist_ok=True)
    link = served / gguf.name
    if not link.exists():
        link.symlink_to(gguf)
    with ModelServer(served) as server:
        yield server.url


@pytest.fixture(scope="module")
def namespace(api) -> Iterator[str]:
    from kubernetes import client

    core = client.CoreV1Api(api)
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"gearshift.dev/e2e": "true"}}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def operator(kubeconfig: Path, namespace: str):
    """The operator from manifests/ running as a process with its ServiceAccount's token, watching only
    this module's namespace."""
    from gearshift.e2e.cluster.operator_process import OperatorProcess

    op = OperatorProcess(kubeconfig, REPO / "manifests", RUN_DIR / f"operator-{namespace}", [namespace])
    _LOGS.append(op.log)
    op.install()
    op.start()
    yield op
    op.stop()
