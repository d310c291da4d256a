"""Certificates and keys for the local control plane, made with the `openssl` command.

One CA signs the API server's serving certificate (valid for 127.0.0.1 and the in-cluster names) and
one client certificate in `system:masters` that the controller-manager, the scheduler, the node agent
and the tests use; the real node's kubelet and kube-proxy get their own (system:node:<name>,
system:kube-proxy), so the Node authorizer and the default RBAC bind them as on any cluster. The
service-account key pair signs ServiceAccount tokens. Files are made once and reused; a missing file is
made again.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

_DAYS = "3650"
NODE_NAME = "gearshift-node"
NODE_IP = "10.43.0.1"  # the API server's and the node's address, on lo: pods can reach it, eth0 cannot
_SANS = (
    f"IP:127.0.0.1,IP:{NODE_IP},IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
    "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(pki: Path, name: str, subject: str, ext: str) -> None:
    if (pki / f"{name}.crt").exists() and (pki / f"{name}.key").exists() and \
            (pki / f"{name}.ext").exists() and (pki / f"{name}.ext").read_text() == ext:
        return  # made with these extensions (an older cert without today's SANs is made again)
    (pki / f"{name}.ext").write_text(ext)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=pki)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", _DAYS, "-extfile", f"{name}.ext", cwd=pki)


def ensure_pki(pki: Path) -> Path:
    """Make (once) ca, apiserver, admin, node, kube-proxy and service-account keys under `pki`."""
    pki.mkdir(parents=True, exist_ok=True)
    if not (pki / "ca.crt").exists():
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
                 "-days", _DAYS, "-subj", "/CN=gearshift-e2e-ca", cwd=pki)
        for stale in ("apiserver.crt", "admin.crt"):  # signed by a CA that is gone
            (pki / stale).unlink(missing_ok=True)
    _signed(pki, "apiserver", "/CN=kube-apiserver",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth\nsubjectAltName={_SANS}\n")
    _signed(pki, "admin", "/O=system:masters/CN=gearshift-admin",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=clientAuth\n")
    client = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    _signed(pki, "node", f"/O=system:nodes/CN=system:node:{NODE_NAME}", client)
    _signed(pki, "kube-proxy", "/CN=system:kube-proxy", client)
    if not (pki / "sa.key").exists():
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    return pki


def kubeconfig_text(server: str, pki: Path, user: str = "admin") -> str:
    """A kubeconfig for `server` authenticating with the client certificate `pki/<user>.crt`."""
    return f"""apiVersion: v1
kind: Config
clusters:
- name: gearshift-e2e
  cluster: {{server: "{server}", certificate-authority: "{pki / 'ca.crt'}"}}
users:
- name: {user}
  user: {{client-certificate: "{pki / (user + '.crt')}", client-key: "{pki / (user + '.key')}"}}
contexts:
- name: gearshift-e2e
  context: {{cluster: gearshift-e2e, user: {user}}}
current-context: gearshift-e2e
"""


def token_kubeconfig_text(server: str, ca_file: Path, token: str, namespace: str) -> str:
    """A kubeconfig that authenticates with a bearer token (a ServiceAccount's), like a pod would."""
    return f"""apiVersion: v1
kind: Config
clusters:
- name: cluster
  cluster: {{server: "{server}", certificate-authority: "{ca_file}"}}
users:
- name: sa
  user: {{token: "{token}"}}
contexts:
- name: sa
  context: {{cluster: cluster, user: sa, namespace: {namespace}}}
current-context: sa
"""


def private_ca_server_cert(directory: Path, san: str) -> tuple[Path, Path, Path]:
    """A fresh private CA and a server certificate it signs for `san` ("IP:10.0.0.5", "DNS:host"): what a
    model server inside a company network presents. Returns (ca.crt, server.crt, server.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=gearshift-test-model-ca", cwd=directory)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=model-server", cwd=directory)
    (directory / "server.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                          f"extendedKeyUsage=serverAuth\nsubjectAltName={san}\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "server.ext", cwd=directory)
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"
