"""`gearshift fetch` (the pods' init container) against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

GEARSHIFT = str(Path(sys.executable).parent / "gearshift")
PAYLOAD = os.urandom(3 * 2**20 + 12345)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /model.gguf with Range support; /flaky.gguf drops the first connection halfway."""

    ranges: list[str | None] = []
    flaky_failures = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path not in ("/model.gguf", "/flaky.gguf"):
            self.send_error(404, "Not Found")
            return
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = PAYLOAD[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.end_headers()
        if self.path == "/flaky.gguf" and type(self).flaky_failures == 0:
            type(self).flaky_failures += 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the connection drops mid-body
            return
        self.wfile.write(body)


@pytest.fixture()
def server() -> Iterator[str]:
    _Handler.ranges = []
    _Handler.flaky_failures = 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def fetch(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([GEARSHIFT, "fetch", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_download_with_checksum_and_progress(server: str, tmp_path: Path) -> None:
    r = fetch(f"{server}/model.gguf", str(tmp_path), "--sha256", SHA)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model.gguf").read_bytes() == PAYLOAD
    assert "fetched 3.0 MiB of 3.0 MiB (100%)" in r.stderr
    assert "sha256 verified" in r.stderr
    assert not (tmp_path / "model.gguf.part").exists()
    again = fetch(f"{server}/model.gguf", str(tmp_path), "--sha256", SHA)
    assert again.returncode == 0 and "already present" in again.stderr
    assert len(_Handler.ranges) == 1  # the second run downloaded nothing


def test_interrupted_download_resumes_with_range(server: str, tmp_path: Path) -> None:
    r = fetch(f"{server}/flaky.gguf", str(tmp_path), "--sha256", SHA)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "flaky.gguf").read_bytes() == PAYLOAD
    assert _Handler.ranges[0] is None
    resumed_at = int(_Handler.ranges[1].split("=")[1].rstrip("-"))
    assert 0 < resumed_at < len(PAYLOAD)
    assert "resuming at" in r.stderr


def test_partial_file_from_a_previous_run_is_resumed(server: str, tmp_path: Path) -> None:
    (tmp_path / "model.gguf.part").write_bytes(PAYLOAD[:1000])
    r = fetch(f"{server}/model.gguf", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert _Handler.ranges == ["bytes=1000-"]
    assert (tmp_path / "model.gguf").read_bytes() == PAYLOAD


def test_checksum_mismatch_is_one_line_and_leaves_nothing(server: str, tmp_path: Path) -> None:
    line = one_line_error(fetch(f"{server}/model.gguf", str(tmp_path), "--sha256", "0" * 64))
    assert f"checksum mismatch for model.gguf: expected sha256 {'0' * 64}, got {SHA}" in line
    assert list(tmp_path.iterdir()) == []


def test_http_error_is_one_line(server: str, tmp_path: Path) -> None:
    line = one_line_error(fetch(f"{server}/missing.gguf", str(tmp_path)))
    assert "HTTP 404" in line and "missing.gguf" in line


def test_unreachable_server_gives_up_clearly(tmp_path: Path) -> None:
    line = one_line_error(fetch("http://127.0.0.1:9/m.gguf", str(tmp_path), "--retries", "2"))
    assert "failed after 2 attempts" in line


@pytest.mark.parametrize("uri", ["s3://b/m.gguf", "https://host/", "pvc://Bad/m.gguf", "hf://org"])
def test_bad_uri_is_one_line(uri: str, tmp_path: Path) -> None:
    assert "model uri" in one_line_error(fetch(uri, str(tmp_path)))


def test_bad_checksum_flag(tmp_path: Path) -> None:
    assert "--sha256 must be 64 hex digits" in one_line_error(fetch("pvc://m/a.gguf", str(tmp_path), "--sha256", "xyz"))


def test_file_uri_copies_and_checks(tmp_path: Path) -> None:
    src = tmp_path / "src" / "m.gguf"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    r = fetch(f"file://{src}", str(tmp_path / "dst"), "--sha256", SHA)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dst" / "m.gguf").read_bytes() == PAYLOAD
    assert "does not exist" in one_line_error(fetch(f"file://{tmp_path}/nope.gguf", str(tmp_path / "dst")))


def test_pvc_uri_is_already_mounted(tmp_path: Path) -> None:
    r = fetch("pvc://models/smollm2/m.gguf", str(tmp_path))
    assert r.returncode == 0 and "nothing to fetch" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_hf_download_error_is_one_line(tmp_path: Path) -> None:
    # No hub is reachable here: a closed loopback port stands for it; the answer must be quick and clear.
    t0 = time.monotonic()
    r = fetch("hf://org/repo/m.gguf", str(tmp_path), env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2",
                                                           "HF_HUB_DOWNLOAD_TIMEOUT": "2"}, timeout=120)
    line = one_line_error(r)
    assert "download of hf://org/repo/m.gguf failed" in line
    assert time.monotonic() - t0 < 110


class _Hub(http.server.BaseHTTPRequestHandler):
    """The hub's file-resolve protocol as huggingface_hub speaks it: HEAD for metadata, then GET."""

    auth: list[str | None] = []

    def log_message(self, *args: object) -> None:
        pass

    def _head(self) -> bool:
        if not self.path.startswith("/org/repo-GGUF/resolve/v1/sub/m.Q4.gguf"):
            self.send_error(404, "Not Found")
            return False
        type(self).auth.append(self.headers.get("Authorization"))
        self.send_response(200)
        self.send_header("X-Repo-Commit", "a" * 40)
        self.send_header("ETag", f'"{SHA}"')
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        return True

    def do_HEAD(self) -> None:  # noqa: N802
        self._head()

    def do_GET(self) -> None:  # noqa: N802
        if self._head():
            self.wfile.write(PAYLOAD)


def test_hf_download_with_token_revision_and_checksum(tmp_path: Path) -> None:
    _Hub.auth = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{httpd.server_address[1]}", "HF_TOKEN": "hf_secret",
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf")}
    try:
        r = fetch("hf://org/repo-GGUF/sub/m.Q4.gguf@v1", str(tmp_path / "models"), "--sha256", SHA, env=env)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "models" / "m.Q4.gguf").read_bytes() == PAYLOAD  # at the top, where the pod looks
        assert "sha256 verified" in r.stderr
        assert _Hub.auth and all(a == "Bearer hf_secret" for a in _Hub.auth)
        missing = fetch("hf://org/repo-GGUF/other.gguf", str(tmp_path / "models"), env=env)
        assert "download of hf://org/repo-GGUF/other.gguf failed" in one_line_error(missing)
    finally:
        httpd.shutdown()
        httpd.server_close()
