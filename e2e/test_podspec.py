"""The node agent's pod -> process translation (pure): env with the downward API and Secrets, `$(VAR)`
expansion, mount paths rewritten to the pod's directories, wildcard addresses to the pod IP."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from gearshift.e2e.node.podspec import PodSpecError, expand, launch, rewrite, volume_dirs, volume_files

POD = {
    "metadata": {"name": "web-1", "namespace": "team", "uid": "u-1", "labels": {"app": "web"}},
    "spec": {
        "nodeName": "n1",
        "volumes": [{"name": "models", "emptyDir": {}}, {"name": "cache", "persistentVolumeClaim": {"claimName": "c"}},
                    {"name": "keys", "secret": {"secretName": "keys"}}],
        "containers": [{
            "name": "engine", "command": ["gearshift"],
            "args": ["serve", "--model", "/models/m.gguf", "--host", "$(POD_IP)", "--cache=/cache/x", "$$(LIT)"],
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "token"}}},
                    {"name": "HOME", "value": "/models/home"},
                    {"name": "URL", "value": "http://$(POD_IP):8000/models"},
                    {"name": "BIND", "value": "0.0.0.0"}],
            "ports": [{"name": "http", "containerPort": 8000}],
            "volumeMounts": [{"name": "models", "mountPath": "/models"}, {"name": "cache", "mountPath": "/cache"}],
        }],
    },
}
SECRETS = {("Secret", "team", "keys"): {"data": {"token": base64.b64encode(b"s3cret").decode()}}}


def lookup(kind: str, ns: str, name: str) -> dict:
    return SECRETS[(kind, ns, name)]


def test_launch_resolves_env_expands_args_and_rewrites_mounts(tmp_path: Path):
    dirs = volume_dirs(POD, tmp_path / "pod", tmp_path / "claims")
    assert dirs["cache"] == tmp_path / "claims" / "team" / "c"
    run = launch(POD, POD["spec"]["containers"][0], pod_ip="127.5.5.2", dirs=dirs, lookup=lookup,
                 entrypoint=["unused"], base_env={"PATH": "/bin"}, default_cwd=str(tmp_path))
    models = str(tmp_path / "pod" / "volumes" / "models")
    assert run.argv == ["gearshift", "serve", "--model", f"{models}/m.gguf", "--host", "127.5.5.2",
                        f"--cache={tmp_path}/claims/team/c/x", "$(LIT)"]
    assert run.env["NS"] == "team" and run.env["APP"] == "web" and run.env["KEY"] == "s3cret"
    assert run.env["HOME"] == f"{models}/home"
    assert run.env["URL"] == "http://127.5.5.2:8000/models"  # a URL path is not a mount path
    assert run.env["BIND"] == "127.5.5.2" and run.env["PATH"] == "/bin"
    assert run.ports == {"http": 8000}


def test_missing_secret_key_is_named():
    bad = {**POD, "spec": {**POD["spec"], "containers": [{**POD["spec"]["containers"][0], "env": [
        {"name": "K", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "nope"}}}]}]}}
    with pytest.raises(PodSpecError, match="no key 'nope'"):
        launch(bad, bad["spec"]["containers"][0], pod_ip="127.5.5.2", dirs={"models": Path("/x"), "cache": Path("/y")},
               lookup=lookup, entrypoint=[], base_env={}, default_cwd="/")


def test_secret_volume_files_and_expansion_rules():
    assert volume_files(POD, lookup) == {"keys": {"token": b"s3cret"}}
    assert expand("a $(X) $(Y) $$(X)", {"X": "1"}) == "a 1 $(Y) $(X)"
    assert rewrite("/modelsx/a", [("/models", "/h")], "127.0.0.9") == "/modelsx/a"
    assert rewrite("0.0.0.0:8000", [], "127.0.0.9") == "127.0.0.9:8000"
