"""An InferenceService's life on a real node: the operator installed in the cluster from manifests/, the
engines in containers of the image built from the Dockerfile, under the operator's securityContext
(non-root, read-only root filesystem, no capabilities), clients through the ClusterIP Service: gguf for one
user, paged for 32, a killed engine, an operator restart mid-rollout, a broken model URI, and deletion.
The tests run in file order and share the resource `smollm2` (a model load is the slow part on 2 cores)."""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gearshift.e2e.cluster.scenario import (
    LOAD_S,
    MODEL_FILE,
    NAME,
    POD_NET,
    assert_hardened,
    chat,
    engine_pid,
    openai_client,
)
from gearshift.e2e.cluster.scenario import spec as base_spec
from gearshift.e2e.cluster.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def spec(model_url, concurrency: int, uri: str | None = None) -> dict:
    return base_spec(uri or model_url(MODEL_FILE), concurrency)


def is_ready(kube, name: str = NAME) -> bool:
    return kube.is_ready(name)


def test_gguf_for_one_user_answers_a_chat(kube, model_url):
    kube.create(NAME, spec(model_url, concurrency=1))
    wait_for(lambda: is_ready(kube), LOAD_S, "smollm2 Ready on the gguf engine")
    st = kube.isvc()["status"]
    assert st["engine"] == "gguf"
    assert st["engineReason"]
    assert kube.condition("ModelReady")["status"] == "True"
    pods = kube.ready_pods()
    assert len(pods) == 1 and pods[0].metadata.labels["gearshift.dev/engine"] == "gguf"
    assert ipaddress.ip_address(pods[0].status.pod_ip) in POD_NET
    assert_hardened(pods[0])
    assert chat(kube.service_ip(), max_tokens=16).strip()


def test_32_users_switch_to_paged_with_requests_answered_during_the_rollout(kube, model_url):
    answered, failures, during_rollout = [], [], []
    stop = threading.Event()

    def client_loop() -> None:
        # A client going through the Service's ClusterIP (kube-proxy picks a ready endpoint), with no
        # retries: a pod going away must leave the endpoints before it stops answering (preStop, then the
        # SIGTERM drain), so every request is answered by one pod or the other.
        ip = kube.service_ip()
        while not stop.is_set():
            try:  # the API server's view, not a request to the model: not counted either way
                rolling = kube.condition("Progressing").get("status") == "True"
            except Exception:  # noqa: BLE001
                rolling = False
            try:
                chat(ip, max_tokens=4)
                answered.append(time.monotonic())
                if rolling:
                    during_rollout.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - recorded; any failure fails the test
                failures.append(repr(e))
            time.sleep(0.2)

    t = threading.Thread(target=client_loop, daemon=True)
    t.start()
    try:
        wait_for(lambda: answered, 60, "a first answer before the rollout")
        kube.patch(NAME, {"concurrency": 32})
        wait_for(lambda: (kube.isvc().get("status") or {}).get("engine") == "paged", 60, "status.engine paged")
        reason = kube.isvc()["status"]["engineReason"]
        assert "32" in reason and "crossover" in reason, reason
        wait_for(lambda: is_ready(kube) and all(p.metadata.labels["gearshift.dev/engine"] == "paged"
                                                for p in kube.pods()), LOAD_S, "the paged rollout to finish")
    finally:
        stop.set()
        t.join(timeout=120)
    print(f"rollout: {len(answered)} requests answered, {len(during_rollout)} while Progressing, "
          f"{len(failures)} failed (no retries)")
    assert not failures, failures
    assert during_rollout, "no request was answered while the rollout was in progress"

    assert_hardened(kube.ready_pods()[0])
    ip = kube.service_ip()

    def stream(i: int) -> str:
        chunks = openai_client(ip).chat.completions.create(
            model=NAME, max_tokens=8, stream=True, temperature=0.7, seed=i,
            messages=[{"role": "user", "content": f"Tell me a fact about the number {i}."}])
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(stream, range(32)))
    assert len(texts) == 32 and all(t.strip() for t in texts), texts


def test_killed_engine_is_restarted_degraded_then_ready(kube):
    pod = kube.ready_pods()[0]
    pid = engine_pid(pod)
    os.kill(pid, 9)
    seen_degraded = wait_for(lambda: kube.condition("Degraded").get("status") == "True" and kube.condition("Degraded"),
                             60, "Degraded after the engine was killed", interval=0.2)
    assert seen_degraded["reason"] in ("ContainerRestarted", "CrashLoopBackOff"), seen_degraded
    wait_for(lambda: is_ready(kube) and kube.condition("Degraded").get("status") == "False", LOAD_S,
             "Ready again and not Degraded")
    pod = kube.ready_pods()[0]
    cs = next(c for c in pod.status.container_statuses if c.name == "engine")
    assert cs.restart_count == 1
    assert engine_pid(pod) != pid
    assert chat(kube.service_ip()).strip()


def test_operator_restarted_mid_rollout_converges_without_duplicates(kube, operator):
    kube.patch(NAME, {"engineArgs": {"maxModelLen": 256}})
    wait_for(lambda: len(kube.pods()) == 2, 60, "the rollout's new pod")
    operator.restart()
    wait_for(lambda: is_ready(kube) and len(kube.pods()) == 1, LOAD_S, "convergence after the restart")
    kube.assert_no_duplicates()
    assert "256" in " ".join(kube.ready_pods()[0].spec.containers[0].args)
    assert chat(kube.service_ip()).strip()


def test_broken_model_uri_reports_the_download_error_then_recovers(kube, model_url):
    kube.create("broken", {**spec(model_url, concurrency=1, uri=model_url("no-such-model.gguf"))})
    cond = wait_for(lambda: kube.condition("ModelReady", "broken").get("reason") == "DownloadFailed"
                    and kube.condition("ModelReady", "broken"), 120, "ModelReady=False DownloadFailed")
    assert cond["status"] == "False"
    assert "404" in cond["message"] or "no-such-model" in cond["message"], cond
    assert kube.condition("Ready", "broken")["status"] == "False"
    kube.patch("broken", {"model": {"uri": model_url(MODEL_FILE)}})
    wait_for(lambda: is_ready(kube, "broken"), LOAD_S, "the fixed resource Ready")
    assert kube.condition("ModelReady", "broken")["status"] == "True"


def test_delete_removes_children_and_processes(kube):
    pids = [engine_pid(p) for n in (NAME, "broken") for p in kube.ready_pods(n)]
    assert pids
    for n in (NAME, "broken"):
        kube.delete(n)

    def all_gone() -> bool:
        for n in (NAME, "broken"):
            sel = f"app.kubernetes.io/instance={n}"
            if kube.apps.list_namespaced_deployment(kube.ns, label_selector=sel).items or \
                    kube.core.list_namespaced_service(kube.ns, label_selector=sel).items or kube.pods(n):
                return False
        return not any(Path(f"/proc/{pid}").exists() for pid in pids)

    wait_for(all_gone, 120, "children, pods and engine containers' processes gone")
