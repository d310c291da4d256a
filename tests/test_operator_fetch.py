"""`gearshift fetch` (the pods' init container) against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import ssl
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
    """A file server as CDNs and object stores behave: a strong ETag and Last-Modified, Range and If-Range
    (200 with the whole file when the validator no longer matches), 416 with `bytes */size`.

    /model.gguf and /<dir>/model.gguf serve `files[path]` (default PAYLOAD); /flaky.gguf drops the first
    connection halfway; /plain.gguf sends no validator at all; /slow.gguf trickles (concurrent fetchers).
    Every request line is recorded (with its query string) as (path, Range, If-Range)."""

    requests: list[tuple[str, str | None, str | None]] = []
    files: dict[str, bytes] = {}
    flaky_failures = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        type(self).requests.append((self.path, rng, if_range))
        if not path.endswith(".gguf") or path.endswith("missing.gguf"):
            self.send_error(404, "Not Found")
            return
        body = type(self).files.get(path, PAYLOAD)
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        validators = path != "/plain.gguf"
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if rng and if_range not in (None, etag):
            rng, start = None, 0  # the file changed: RFC 9110 says send it whole
        if rng and start >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        chunk = body[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(chunk)))
        if validators:
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", "Mon, 30 Nov 2026 10:00:00 GMT")
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if path == "/flaky.gguf" and type(self).flaky_failures == 0:
            type(self).flaky_failures += 1
            self.wfile.write(chunk[: len(chunk) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the connection drops mid-body
            return
        step = 256 * 1024 if path == "/slow.gguf" else len(chunk) or 1
        for i in range(0, len(chunk), step):
            self.wfile.write(chunk[i:i + step])
            if path == "/slow.gguf":
                time.sleep(0.05)

    @classmethod
    def gets(cls, path: str) -> list[tuple[str, str | None, str | None]]:
        return [r for r in cls.requests if r[0].split("?", 1)[0] == path]


@pytest.fixture()
def server() -> Iterator[str]:
    _Handler.requests = []
    _Handler.files = {}
    _Handler.flaky_failures = 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The same file server behind TLS with a certificate from a private CA: (its URL, the CA's PEM)."""
    from gearshift.e2e.cluster.pki import private_ca_server_cert

    ca, cert, key = private_ca_server_cert(tmp_path_factory.mktemp("pki"), "IP:127.0.0.1")
    _Handler.requests = []
    _Handler.files = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", ca
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
    assert len(_Handler.requests) == 1  # the second run downloaded nothing


def test_download_logs_rate_and_eta_as_it_goes(server: str, tmp_path: Path) -> None:
    """Every 10% (and every few seconds) one line: how much of how much, the rate, the time left."""
    r = fetch(f"{server}/slow.gguf?X-Amz-Signature=s3cr3t", str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "fetched" in ln]
    midway = [ln for ln in lines[:-1]
              if re.search(r"fetched \d+\.\d MiB of 3\.0 MiB \(\d+%\), \d+\.\d MiB/s, ETA \d+\.\ds$", ln)]
    assert len(midway) >= 2, r.stderr  # 1 MiB reads of 3 MiB cross 10% steps at least twice before the end
    assert re.search(r"fetched 3\.0 MiB of 3\.0 MiB \(100%\), \d+\.\d MiB/s$", lines[-1]), r.stderr
    assert "s3cr3t" not in r.stderr


def test_interrupted_download_resumes_with_if_range(server: str, tmp_path: Path) -> None:
    r = fetch(f"{server}/flaky.gguf", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "flaky.gguf").read_bytes() == PAYLOAD
    (first, second) = _Handler.gets("/flaky.gguf")
    assert first[1:] == (None, None)
    resumed_at = int(second[1].split("=")[1].rstrip("-"))
    assert 0 < resumed_at < len(PAYLOAD)
    assert second[2] == f'"{SHA[:16]}"'  # If-Range: the resume is only valid for the same file
    assert "resuming at" in r.stderr


def _partial(tmp_path: Path, server: str, data: bytes, etag: str | None, size: int) -> None:
    """What an interrupted earlier run leaves: the partial and the validator it came with."""
    (tmp_path / "model.gguf.part").write_bytes(data)
    (tmp_path / "model.gguf.part.json").write_text(json.dumps(
        {"url": f"{server}/model.gguf", "etag": etag, "last_modified": None, "size": size}))


def test_partial_file_from_a_previous_run_is_resumed(server: str, tmp_path: Path) -> None:
    _partial(tmp_path, server, PAYLOAD[:1000], f'"{SHA[:16]}"', len(PAYLOAD))
    r = fetch(f"{server}/model.gguf", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert [g[1:] for g in _Handler.requests] == [("bytes=1000-", f'"{SHA[:16]}"')]
    assert (tmp_path / "model.gguf").read_bytes() == PAYLOAD


def test_a_partial_of_a_file_that_changed_is_not_spliced(server: str, tmp_path: Path) -> None:
    new = os.urandom(len(PAYLOAD))
    _Handler.files["/model.gguf"] = new  # the file on the server was replaced since the partial
    _partial(tmp_path, server, PAYLOAD[:1000], f'"{SHA[:16]}"', len(PAYLOAD))
    r = fetch(f"{server}/model.gguf", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model.gguf").read_bytes() == new  # not 1000 old bytes + the new file's tail
    assert "the file changed on the server" in r.stderr


def test_a_partial_without_a_validator_starts_over(server: str, tmp_path: Path) -> None:
    (tmp_path / "plain.gguf.part").write_bytes(b"x" * 1000)  # no record of where it came from
    r = fetch(f"{server}/plain.gguf", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert [g[1] for g in _Handler.requests] == [None]
    assert (tmp_path / "plain.gguf").read_bytes() == PAYLOAD
    # With an expected sha256 the end result is proven, so a partial may be resumed.
    (tmp_path / "plain.gguf").unlink()
    (tmp_path / "plain.gguf.part").write_bytes(PAYLOAD[:1000])
    (tmp_path / "plain.gguf.part.json").write_text(json.dumps(
        {"url": f"{server}/plain.gguf", "etag": None, "last_modified": None, "size": len(PAYLOAD)}))
    assert fetch(f"{server}/plain.gguf", str(tmp_path), "--sha256", SHA).returncode == 0
    assert _Handler.requests[-1][1:] == ("bytes=1000-", None)


def test_416_counts_as_complete_only_at_the_recorded_size(server: str, tmp_path: Path) -> None:
    _partial(tmp_path, server, PAYLOAD, f'"{SHA[:16]}"', len(PAYLOAD))  # whole, not yet renamed
    r = fetch(f"{server}/model.gguf", str(tmp_path), "--sha256", SHA)
    assert r.returncode == 0, r.stderr
    assert len(_Handler.requests) == 1 and (tmp_path / "model.gguf").read_bytes() == PAYLOAD
    # A partial longer than the file (junk after a crash): the 416 says the size differs.
    (tmp_path / "model.gguf").unlink()
    (tmp_path / "model.gguf.source").unlink()
    _partial(tmp_path, server, PAYLOAD + b"junk", f'"{SHA[:16]}"', len(PAYLOAD))
    r = fetch(f"{server}/model.gguf", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model.gguf").read_bytes() == PAYLOAD
    assert f"the server has {len(PAYLOAD)} bytes, the partial {len(PAYLOAD) + 4}" in r.stderr


def test_a_changed_uri_never_serves_the_old_file(server: str, tmp_path: Path) -> None:
    other = os.urandom(4096)
    _Handler.files["/v2/model.gguf"] = other
    assert fetch(f"{server}/v1/model.gguf", str(tmp_path)).returncode == 0
    r = fetch(f"{server}/v2/model.gguf", str(tmp_path))  # same file name, another file
    assert r.returncode == 0, r.stderr
    assert "already present" not in r.stderr and (tmp_path / "model.gguf").read_bytes() == other
    # A file from before the .source records (or copied in by hand) is not trusted either.
    (tmp_path / "model.gguf.source").unlink()
    assert fetch(f"{server}/v2/model.gguf", str(tmp_path)).returncode == 0
    assert len(_Handler.gets("/v2/model.gguf")) == 2


def test_concurrent_fetchers_into_one_cache_take_turns(server: str, tmp_path: Path) -> None:
    """Replicas sharing a cache claim start together: one downloads, the others wait and reuse it."""
    procs = [subprocess.Popen([GEARSHIFT, "fetch", f"{server}/slow.gguf", str(tmp_path), "--sha256", SHA],
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ)) for _ in range(4)]
    outs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    assert (tmp_path / "slow.gguf").read_bytes() == PAYLOAD
    assert len(_Handler.gets("/slow.gguf")) == 1
    assert sum("already present" in o for o in outs) == 3
    assert any("another fetcher is writing slow.gguf" in o for o in outs)


def test_signed_url_query_and_credentials_never_reach_the_logs(server: str, tmp_path: Path) -> None:
    host = server.removeprefix("http://")
    signed = f"http://user:pa55word@{host}/model.gguf?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIAXYZ"
    r = fetch(signed, str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "s3cr3t" in _Handler.requests[0][0]  # the server got the signed URL
    for bad in (f"{server}/missing.gguf?token=s3cr3t", "http://user:pa55word@127.0.0.1:9/m.gguf?sig=s3cr3t"):
        r = fetch(bad, str(tmp_path / "x"), "--retries", "1")
        assert r.returncode == 2 and "?<redacted>" in r.stderr
        assert "s3cr3t" not in r.stderr and "pa55word" not in r.stderr
    files = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".gguf")
    assert "s3cr3t" not in files and "pa55word" not in files and "AKIAXYZ" not in files


def test_checksum_mismatch_is_one_line_and_leaves_nothing(server: str, tmp_path: Path) -> None:
    line = one_line_error(fetch(f"{server}/model.gguf", str(tmp_path), "--sha256", "0" * 64))
    assert f"checksum mismatch for model.gguf: expected sha256 {'0' * 64}, got {SHA}" in line
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf.lock"]  # the lock file only: no bytes


def test_http_error_is_one_line(server: str, tmp_path: Path) -> None:
    line = one_line_error(fetch(f"{server}/missing.gguf", str(tmp_path)))
    assert "HTTP 404" in line and "missing.gguf" in line


def test_unreachable_server_gives_up_clearly(tmp_path: Path) -> None:
    line = one_line_error(fetch("http://127.0.0.1:9/m.gguf", str(tmp_path), "--retries", "2"))
    assert "failed after 2 attempts" in line


def test_https_from_a_private_ca_needs_its_bundle(tls_server: tuple[str, Path], tmp_path: Path) -> None:
    url, ca = tls_server
    refused = one_line_error(fetch(f"{url}/model.gguf", str(tmp_path / "a"), "--retries", "5"))
    assert "TLS certificate not trusted" in refused and "caConfigMapRef" in refused, refused
    assert "attempt" not in fetch(f"{url}/model.gguf", str(tmp_path / "b")).stderr  # permanent: no retries
    ok = fetch(f"{url}/model.gguf", str(tmp_path / "c"), "--ca-file", str(ca), "--sha256", SHA)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "c" / "model.gguf").read_bytes() == PAYLOAD


def test_a_ca_file_that_is_not_pem_is_one_line(tls_server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = tls_server
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate")
    assert "not a readable PEM certificate bundle" in one_line_error(
        fetch(f"{url}/model.gguf", str(tmp_path / "m"), "--ca-file", str(junk)))


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
    gets = 0

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
            type(self).gets += 1
            self.wfile.write(PAYLOAD)


def test_hf_download_with_token_revision_and_checksum(tmp_path: Path) -> None:
    _Hub.auth = []
    _Hub.gets = 0
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
        assert _Hub.gets == 1
        again = fetch("hf://org/repo-GGUF/sub/m.Q4.gguf@v1", str(tmp_path / "models"), "--sha256", SHA, env=env)
        assert again.returncode == 0, again.stderr
        assert _Hub.gets == 1  # a file in a sub-folder is found again on the next start: not downloaded twice
        assert (tmp_path / "models" / "m.Q4.gguf").read_bytes() == PAYLOAD
        missing = fetch("hf://org/repo-GGUF/other.gguf", str(tmp_path / "models"), env=env)
        assert "download of hf://org/repo-GGUF/other.gguf failed" in one_line_error(missing)
    finally:
        httpd.shutdown()
        httpd.server_close()
