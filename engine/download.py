"""Resumable HTTP(S) download of one model file into a directory that several pods may share.

- Identity: a file is the URL without its query string and user info (signed-URL signatures and dates
  change on every signing and must not force a new download; they are never written anywhere).
- A finished file has a sidecar `<name>.source` ({url, size, sha256 when checked}); a file whose sidecar
  names another URL (or none: an older layout) is downloaded again, so a changed URI never serves the
  old file.
- A partial `<name>.part` is resumed only when it is provably the same file: its sidecar `<name>.part.json`
  records the URL, size and validator (strong ETag, else Last-Modified) of the response it came from, and
  the resume asks `Range` + `If-Range` (the server answers 200 with the whole file if it changed). Without
  a validator, only an expected sha256 (checked at the end) allows a resume. A 206 must start where the
  partial ends and have the recorded size; a 416 counts as complete only at exactly that size.
- Several fetchers of one file (replicas sharing a cache claim) take turns on `<name>.lock`: the second
  waits, then finds the file complete. The partial is renamed into place atomically.
- TLS: the public roots (certifi, as httpx trusts by default) plus, with `ca_file`, a private CA's PEM
  bundle (a model server inside the cluster, a corporate mirror). A certificate that does not verify is
  permanent: retrying cannot fix it, the message says which setting adds a CA.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import ssl
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gearshift.engine.errors import GearshiftError
from gearshift.engine.progress import Progress, mib

_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)")


def redact(url: str) -> str:
    """The URL as logs and status may show it: no user info, no query string (tokens, signatures)."""
    try:
        u = urlsplit(url)
    except ValueError:
        return "(malformed url)"
    host = u.hostname or ""
    if u.port:
        host = f"{host}:{u.port}"
    return urlunsplit((u.scheme, host, u.path, "", "")) + ("?<redacted>" if u.query else "")


def log(msg: str) -> None:
    print(f"gearshift fetch: {msg}", file=sys.stderr, flush=True)


class PermanentError(Exception):
    """The server's answer will not change on a retry (404, 403, ...)."""


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The roots downloads trust: certifi's public ones, plus the PEM bundle at `ca_file` when given."""
    import certifi

    ctx = ssl.create_default_context(cafile=certifi.where())
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise GearshiftError(f"--ca-file {ca_file}: not a readable PEM certificate bundle ({e})") from None
    return ctx


def _tls_failure(e: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate error under an httpx transport error, if that is what it is."""
    while e is not None:
        if isinstance(e, ssl.SSLCertVerificationError):
            return e
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


class _Restart(Exception):
    """The partial is not provably the same file: drop it and start over."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@contextmanager
def locked(dest: Path) -> Iterator[None]:
    """One fetcher of `dest` at a time, across processes and pods sharing the directory."""
    with open(dest.with_name(dest.name + ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another fetcher is writing {dest.name}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def complete(dest: Path, ident: str, sha256: str | None) -> bool:
    """`dest` is the finished download of `ident` (and of `sha256`, when one is expected)."""
    src = _read_json(dest.with_name(dest.name + ".source"))
    if not dest.is_file() or src.get("url") != ident or src.get("size") != dest.stat().st_size:
        return False
    return sha256 is None or src.get("sha256") == sha256.lower()


def mark_complete(dest: Path, ident: str, sha256: str | None) -> None:
    _write_json(dest.with_name(dest.name + ".source"),
                {"url": ident, "size": dest.stat().st_size, "sha256": sha256.lower() if sha256 else None})


def download(httpx: Any, url: str, part: Path, sha256: str | None,  # noqa: ANN401 - httpx module
             tls: ssl.SSLContext | None = None) -> None:
    """One attempt: bring `part` to the whole file, resuming it when it is provably the same file."""
    ident = redact(url)
    meta_path = part.with_name(part.name + ".json")
    meta = _read_json(meta_path)
    have = part.stat().st_size if part.exists() else 0
    validator = meta.get("etag") or meta.get("last_modified")
    if have and (meta.get("url") != ident or not (validator or sha256)):
        log("a partial download of another or unverifiable file is here; starting over")
        have = 0
    headers = {}
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator:
            headers["If-Range"] = validator
    with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=30.0,
                      verify=tls if tls is not None else True) as r:
        if r.status_code == 416 and have:
            total = _CONTENT_RANGE.fullmatch(r.headers.get("content-range", ""))
            if total and total[3] == str(have) == str(meta.get("size")):
                return  # the partial is the whole file
            raise _Restart(f"the server has {total[3] if total else 'an unknown size'} bytes, the partial {have}")
        if r.status_code == 429 or r.status_code >= 500:
            raise OSError(f"HTTP {r.status_code} {r.reason_phrase}")
        if r.status_code not in (200, 206):
            raise PermanentError(f"download of {ident} failed: HTTP {r.status_code} {r.reason_phrase}")
        if r.status_code == 206:
            got = _CONTENT_RANGE.fullmatch(r.headers.get("content-range", ""))
            if not have or not got or got[1] != str(have) or got[3] != str(meta.get("size")):
                raise _Restart(f"the server answered a range other than the one asked ({got[0] if got else 'none'})")
            log(f"resuming at {mib(have)}")
        else:
            if have:
                log("the file changed on the server or it ignored the range; starting over")
            have = 0
            etag = r.headers.get("etag", "")
            size = r.headers.get("content-length")
            _write_json(meta_path, {"url": ident, "etag": etag if etag and not etag.startswith("W/") else None,
                                    "last_modified": r.headers.get("last-modified"),
                                    "size": int(size) if size is not None else None})
            meta = _read_json(meta_path)
        _write_body(r, part, have, meta.get("size"))


def _write_body(r: Any, part: Path, have: int, total: int | None) -> None:  # noqa: ANN401 - httpx response
    """Append the body to `part`, reporting size, rate and ETA every few seconds and every 10%."""
    done = have
    progress = Progress(total=total, start=time.monotonic(), done=have, every_s=5.0, step=0.1)
    with open(part, "ab" if have else "wb") as f:
        for chunk in r.iter_bytes(1 << 20):
            f.write(chunk)
            done += len(chunk)
            line = progress.update(done, time.monotonic())
            if line is not None and done != total:
                log(f"fetched {line}")
    progress.done = done
    log(f"fetched {progress.line(time.monotonic())}")
    if total is not None and done < total:
        raise OSError(f"connection closed at {mib(done)} of {mib(total)}")


def fetch_url(url: str, dest: Path, sha256: str | None, retries: int,
              verify: Any, ca_file: str | None = None) -> Path:  # noqa: ANN401 - verify(path, sha256) raises
    import httpx

    ident = redact(url)
    tls = tls_context(ca_file)
    with locked(dest):
        if complete(dest, ident, sha256):
            log(f"{dest} already present")
            return dest
        part = dest.with_name(dest.name + ".part")
        last_error = "no attempt made"
        for attempt in range(1, max(1, retries) + 1):
            try:
                download(httpx, url, part, sha256, tls)
                break
            except PermanentError as e:
                raise GearshiftError(str(e)) from None
            except _Restart as e:
                last_error = str(e)
                log(f"{e}; starting over")
                part.unlink(missing_ok=True)
            except (httpx.TransportError, OSError) as e:
                if (bad := _tls_failure(e)) is not None:
                    hint = "" if ca_file else " (a private CA: spec.model.caConfigMapRef, or `gearshift fetch --ca-file`)"
                    raise GearshiftError(f"download of {ident}: TLS certificate not trusted: "
                                         f"{bad.verify_message or bad.reason}{hint}") from None
                last_error = f"{type(e).__name__}: {_scrub(str(e), url)}"
                log(f"attempt {attempt} interrupted ({last_error}); resuming")
                time.sleep(min(2.0**attempt * 0.1, 5.0))
        else:
            raise GearshiftError(f"download of {ident} failed after {retries} attempts: {last_error}")
        try:
            verify(part, sha256)  # removes a corrupt partial: it must not be resumed
        finally:
            part.with_name(part.name + ".json").unlink(missing_ok=True)
        os.replace(part, dest)
        mark_complete(dest, ident, sha256)
        return dest


def _scrub(text: str, url: str) -> str:
    """An exception's text with the full URL (and its query string) replaced by the redacted one."""
    query = urlsplit(url).query
    text = text.replace(url, redact(url))
    return text.replace(query, "<redacted>") if query else text

