"""Pure translation of a Pod (its JSON as a dict, camelCase keys) into local process launches.

No Kubernetes client here: Secrets and ConfigMaps come through a `lookup(kind, namespace, name)` callback.
How a container becomes a process:
- its command (or the image's entrypoint) + args, `$(VAR)` expanded like the kubelet does;
- env: literal values, downward API (fieldRef, resourceFieldRef), secretKeyRef/configMapKeyRef, envFrom;
- each volumeMount's mountPath is a host directory; every occurrence of a mountPath in the command,
  args, env values and probe commands is rewritten to that directory (the process sees host paths);
- the pod's own loopback IP replaces the wildcard addresses 0.0.0.0 and :: in args and env values, so
  each pod binds its own address and pods never fight over a port.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Lookup = Callable[[str, str, str], dict]  # (kind "Secret"|"ConfigMap", namespace, name) -> object JSON

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class PodSpecError(ValueError):
    """The pod asks for something the node agent cannot provide (a missing Secret key, say)."""


@dataclass
class Launch:
    """One container as a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    ports: dict[str, int] = field(default_factory=dict)  # port name -> number


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known variables are replaced, `$$` is a literal `$`."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, text)


def volume_dirs(pod: dict, pod_dir: Path, claims_dir: Path) -> dict[str, Path]:
    """Each volume's host directory: emptyDir and Secret/ConfigMap copies under the pod's directory, a
    PVC under `claims_dir/<namespace>/<claimName>` (shared by every pod using the claim), hostPath as is."""
    ns = pod["metadata"]["namespace"]
    dirs: dict[str, Path] = {}
    for vol in pod["spec"].get("volumes") or []:
        name = vol["name"]
        if "persistentVolumeClaim" in vol:
            dirs[name] = claims_dir / ns / vol["persistentVolumeClaim"]["claimName"]
        elif "hostPath" in vol:
            dirs[name] = Path(vol["hostPath"]["path"])
        else:  # emptyDir, secret, configMap, projected, downwardAPI
            dirs[name] = pod_dir / "volumes" / name
    return dirs


def volume_files(pod: dict, lookup: Lookup) -> dict[str, dict[str, bytes]]:
    """The files to write into Secret / ConfigMap / projected volumes: volume name -> {relpath: bytes}."""
    ns = pod["metadata"]["namespace"]
    out: dict[str, dict[str, bytes]] = {}

    def from_source(kind: str, src: dict) -> dict[str, bytes]:
        name = src.get("secretName") or src.get("name")
        try:
            obj = lookup(kind, ns, name)
        except KeyError:
            if src.get("optional"):
                return {}
            raise PodSpecError(f"{kind} {ns}/{name} not found") from None
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()} if kind == "Secret" \
            else {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        items = src.get("items")
        return {it["path"]: data[it["key"]] for it in items if it["key"] in data} if items else data

    for vol in pod["spec"].get("volumes") or []:
        if "secret" in vol:
            out[vol["name"]] = from_source("Secret", vol["secret"])
        elif "configMap" in vol:
            out[vol["name"]] = from_source("ConfigMap", vol["configMap"])
        elif "projected" in vol:
            files: dict[str, bytes] = {}
            for s in vol["projected"].get("sources") or []:
                if "secret" in s:
                    files.update(from_source("Secret", s["secret"]))
                elif "configMap" in s:
                    files.update(from_source("ConfigMap", s["configMap"]))
            out[vol["name"]] = files
    return out


def mounts(container: dict, dirs: dict[str, Path]) -> list[tuple[str, str]]:
    """(mountPath, host path) for a container, longest mountPath first so nested mounts win."""
    pairs = []
    for m in container.get("volumeMounts") or []:
        host = dirs[m["name"]]
        if m.get("subPath"):
            host = host / m["subPath"]
        pairs.append((m["mountPath"].rstrip("/") or "/", str(host)))
    return sorted(pairs, key=lambda p: -len(p[0]))


def rewrite(text: str, mount_pairs: list[tuple[str, str]], pod_ip: str) -> str:
    """Replace mount paths (as whole path prefixes) with host directories, wildcard addresses with the
    pod IP."""
    for mount_path, host in mount_pairs:
        text = re.sub(r"(?<![\w.\-/])" + re.escape(mount_path) + r"(?=/|$|[\s'\"=:,;])",
                      lambda _m, h=host: h, text)
    if text in ("0.0.0.0", "::", "[::]"):
        return pod_ip
    return re.sub(r"(?<=[=/\s])0\.0\.0\.0(?=[:\s]|$)|^0\.0\.0\.0(?=:)", pod_ip, text)


def _field_ref(pod: dict, path: str, pod_ip: str) -> str:
    meta = pod["metadata"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
        "metadata.uid": meta.get("uid", ""), "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.hostIP": "127.0.0.1", "status.podIP": pod_ip, "status.podIPs": pod_ip,
    }
    if path not in simple:
        raise PodSpecError(f"downward API field {path!r} is not supported by the test node")
    return simple[path]


def _quantity(q: str) -> float:
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
             "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    if not m or (m.group(2) and m.group(2) not in units):
        raise PodSpecError(f"cannot read quantity {q!r}")
    return float(m.group(1)) * units.get(m.group(2), 1)


def _resource_ref(container: dict, ref: dict, node_cpus: int, node_memory: int) -> str:
    kind, _, res = ref["resource"].partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(res)
    if value is None:  # no limit: the kubelet reports the node's allocatable
        return str(node_cpus if res == "cpu" else node_memory)
    divisor = _quantity(ref.get("divisor", "1"))
    return str(math.ceil(_quantity(value) / divisor))


def container_env(pod: dict, container: dict, pod_ip: str, lookup: Lookup,
                  node_cpus: int, node_memory: int) -> dict[str, str]:
    """The container's environment as Kubernetes defines it (without the process's base env)."""
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        kind, ref = ("Secret", src["secretRef"]) if "secretRef" in src else ("ConfigMap", src["configMapRef"])
        try:
            data = lookup(kind, ns, ref["name"]).get("data") or {}
        except KeyError:
            if ref.get("optional"):
                continue
            raise PodSpecError(f"{kind} {ns}/{ref['name']} not found") from None
        for k, v in data.items():
            env[src.get("prefix", "") + k] = base64.b64decode(v).decode() if kind == "Secret" else v
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var:
            env[name] = expand(var["value"] or "", env)
            continue
        vf = var.get("valueFrom") or {}
        if "fieldRef" in vf:
            env[name] = _field_ref(pod, vf["fieldRef"]["fieldPath"], pod_ip)
        elif "resourceFieldRef" in vf:
            env[name] = _resource_ref(container, vf["resourceFieldRef"], node_cpus, node_memory)
        elif "secretKeyRef" in vf or "configMapKeyRef" in vf:
            kind, ref = ("Secret", vf["secretKeyRef"]) if "secretKeyRef" in vf else ("ConfigMap", vf["configMapKeyRef"])
            try:
                data = lookup(kind, ns, ref["name"]).get("data") or {}
                raw = data[ref["key"]]
            except KeyError:
                if ref.get("optional"):
                    continue
                raise PodSpecError(f"{kind} {ns}/{ref['name']} has no key {ref['key']!r}") from None
            env[name] = base64.b64decode(raw).decode() if kind == "Secret" else raw
        else:
            env[name] = ""
    return env


def launch(pod: dict, container: dict, *, pod_ip: str, dirs: dict[str, Path], lookup: Lookup,
           entrypoint: list[str], base_env: dict[str, str], default_cwd: str,
           node_cpus: int = 2, node_memory: int = 8 * 2**30) -> Launch:
    """How to run `container` of `pod` as a process on this machine."""
    pairs = mounts(container, dirs)
    env = container_env(pod, container, pod_ip, lookup, node_cpus, node_memory)
    env = {k: rewrite(v, pairs, pod_ip) for k, v in env.items()}
    command = container.get("command") or entrypoint
    argv = [rewrite(expand(a, env), pairs, pod_ip) for a in [*command, *(container.get("args") or [])]]
    cwd = rewrite(container["workingDir"], pairs, pod_ip) if container.get("workingDir") else default_cwd
    ports = {p["name"]: p["containerPort"] for p in container.get("ports") or [] if p.get("name")}
    return Launch(name=container["name"], argv=argv, env={**base_env, **env}, cwd=cwd, ports=ports)
