"""The test node agent: registers a Node, heartbeats it, and runs the pods bound to it (one PodRunner
thread each), each pod on its own loopback address. Deleted pods get their processes killed and are then
removed from the API server (grace period 0), as the kubelet does."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import zlib
from pathlib import Path

from gearshift.e2e.node.pod_runner import PodRunner, now_iso

log = logging.getLogger("gearshift.e2e.node")
TAINT_KEY = "gearshift.dev/e2e-node"
HEARTBEAT_S = 10.0


class NodeAgent:
    def __init__(self, kubeconfig: str | Path, name: str, root: Path, *, taint: bool = True,
                 cpus: int = 32, memory_gi: int = 128):
        from kubernetes import client, config

        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.name, self.root, self.taint = name, Path(root), taint
        self.cpus, self.memory_gi = cpus, memory_gi
        venv_bin = Path(sys.executable).parent  # the project's .venv: the pods' "image"
        self.base_env = {"PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin", "PYTHONSAFEPATH": "1",
                         "LANG": os.environ.get("LANG", "C.UTF-8")}
        self.entrypoint = [str(venv_bin / "gearshift")]
        self.runners: dict[str, PodRunner] = {}  # pod uid -> runner
        self._done: set[str] = set()  # uids whose runner finished (never run again)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        h = zlib.crc32(name.encode())
        self._net = f"127.{100 + h % 100}.{(h >> 8) % 256}."  # this node's /24 inside 127.0.0.0/8
        self._ips: dict[str, str] = {}  # uid -> ip

    # -- the Node object --------------------------------------------------------------------------
    def _node_status(self) -> dict:
        t = now_iso()
        res = {"cpu": str(self.cpus), "memory": f"{self.memory_gi}Gi", "pods": "110",
               "ephemeral-storage": "100Gi"}
        cond = [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "gearshift e2e node agent is posting ready status",
                 "lastHeartbeatTime": t, "lastTransitionTime": self._ready_since}]
        for kind in ("MemoryPressure", "DiskPressure", "PIDPressure"):
            cond.append({"type": kind, "status": "False", "reason": f"KubeletHasNo{kind}",
                         "lastHeartbeatTime": t, "lastTransitionTime": self._ready_since})
        return {"capacity": res, "allocatable": res, "conditions": cond,
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                              {"type": "Hostname", "address": self.name}],
                "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": os.uname().release,
                             "osImage": "gearshift e2e node", "containerRuntimeVersion": "gearshift-e2e://0.1",
                             "kubeletVersion": "v1.20.2", "kubeProxyVersion": "none",
                             "operatingSystem": "linux", "architecture": "amd64"}}

    def register(self) -> None:
        from kubernetes.client.exceptions import ApiException

        self._ready_since = now_iso()
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.name, "labels": {"kubernetes.io/hostname": self.name,
                                                           "kubernetes.io/os": "linux",
                                                           "kubernetes.io/arch": "amd64", TAINT_KEY: "true"}},
                "spec": {"taints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}] if self.taint else []}}
        try:
            self.core.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
            self.core.patch_node(self.name, {"spec": body["spec"], "metadata": {"labels": body["metadata"]["labels"]}})
        self.core.patch_node_status(self.name, {"status": self._node_status()})

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.core.patch_node_status(self.name, {"status": self._node_status()})
            except Exception as e:  # the API may blip; the next beat retries
                log.warning("node heartbeat failed: %s", e)

    # -- pods -------------------------------------------------------------------------------------
    def lookup(self, kind: str, namespace: str, name: str) -> dict:
        from kubernetes.client.exceptions import ApiException

        read = self.core.read_namespaced_secret if kind == "Secret" else self.core.read_namespaced_config_map
        try:
            return json.loads(read(name, namespace, _preload_content=False).data)
        except ApiException as e:
            if e.status == 404:
                raise KeyError(name) from None
            raise

    def _alloc_ip(self, uid: str) -> str:
        used = set(self._ips.values())
        for n in range(2, 255):
            ip = f"{self._net}{n}"
            if ip not in used:
                self._ips[uid] = ip
                return ip
        raise RuntimeError("no free pod address on this node")

    def _gone(self, pod: dict) -> None:
        """Runner finished: free its address; if the pod was being deleted, finish the deletion."""
        from kubernetes.client.exceptions import ApiException

        uid = pod["metadata"]["uid"]
        with self._lock:
            self._ips.pop(uid, None)
            self.runners.pop(uid, None)
            self._done.add(uid)
        if self._stop.is_set():
            return
        try:
            cur = json.loads(self.core.read_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                                           _preload_content=False).data)
            if cur["metadata"]["uid"] == uid and cur["metadata"].get("deletionTimestamp"):
                # In the body: with a body present the API server ignores the gracePeriodSeconds query.
                self.core.delete_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                                body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}})
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("could not finish deleting %s: %s", pod["metadata"]["name"], e)

    def sync(self) -> None:
        resp = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.name}",
                                                     _preload_content=False)
        pods = {p["metadata"]["uid"]: p for p in json.loads(resp.data)["items"]}
        with self._lock:
            for uid, runner in list(self.runners.items()):
                pod = pods.get(uid)
                if pod is None or pod["metadata"].get("deletionTimestamp"):
                    runner.stop()
            for uid, pod in pods.items():
                if uid in self.runners or uid in self._done:
                    continue
                if pod["metadata"].get("deletionTimestamp"):
                    self._done.add(uid)
                    threading.Thread(target=self._gone, args=(pod,), daemon=True).start()
                    continue
                if pod["status"].get("phase") in ("Succeeded", "Failed"):
                    continue
                runner = PodRunner(pod, ip=self._alloc_ip(uid), root=self.root, core=self.core,
                                   lookup=self.lookup, entrypoint=self.entrypoint, base_env=self.base_env,
                                   on_gone=self._gone)
                self.runners[uid] = runner
                log.info("running pod %s/%s on %s", pod["metadata"]["namespace"], pod["metadata"]["name"],
                         runner.ip)
                runner.start()

    def run(self, stop: threading.Event | None = None) -> None:
        """Register, then keep the node's pods running until `stop` (or `shutdown()`)."""
        stop = stop or self._stop
        self.register()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        while not stop.is_set() and not self._stop.is_set():
            try:
                self.sync()
            except Exception as e:  # the API may blip; keep the pods running and retry
                log.warning("pod sync failed: %s", e)
            stop.wait(0.5)
        self.shutdown()

    def shutdown(self) -> None:
        """Kill every pod's processes and deregister the node."""
        self._stop.set()
        with self._lock:
            runners = list(self.runners.values())
        for r in runners:
            r.stop()
        for r in runners:
            r.join(timeout=15)
        try:
            self.core.delete_node(self.name)
        except Exception as e:  # already gone, or the API is down: nothing more to do
            log.debug("node delete: %s", e)
