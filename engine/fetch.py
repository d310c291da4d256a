"""`gearshift fetch URI DIR`: bring a model into DIR (the pods' init container; `gearshift up` too).

URIs: pvc://claim/path (already mounted: nothing to do), file:///path (copied), https:// or http://
(resumed with a Range request after an interruption, progress in the log, sha256 checked when given),
hf://org/repo[/file][@revision] (huggingface_hub, token from $HF_TOKEN).

`parse_model_uri` is pure and shared with the operator, which must compute the same local path as the
fetch writes to. Network libraries are imported only when a download runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gearshift.engine.download import fetch_url, log, redact
from gearshift.engine.errors import GearshiftError

Scheme = Literal["pvc", "file", "https", "http", "hf"]
ModelFormat = Literal["gguf", "safetensors"]
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_HF_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ModelURI:
    uri: str
    scheme: Scheme
    path: str  # pvc: path inside the claim; file: absolute path; http(s): URL path; hf: file in repo or ""
    claim: str | None = None  # pvc only
    repo_id: str | None = None  # hf only: "org/repo"
    revision: str | None = None  # hf only

    @property
    def format(self) -> ModelFormat:
        """What the weights are, from the name: a .gguf file, else a safetensors model (file or directory)."""
        return "gguf" if self.path.lower().endswith(".gguf") else "safetensors"

    @property
    def display(self) -> str:
        """The URI as logs, Events and status may show it: an http(s) URL without its query string or
        user info (signed URLs carry their token there)."""
        return redact(self.uri) if self.scheme in ("https", "http") else self.uri

    @property
    def local_name(self) -> str:
        """The file or directory name the fetch creates under its target directory."""
        if self.scheme == "hf" and not self.path:
            return self.repo_id.split("/")[1]  # type: ignore[union-attr]
        return os.path.basename(self.path.rstrip("/"))


def _shown(uri: str) -> str:
    """`uri` for an error message: redacted when it carries a query string or user info."""
    return redact(uri) if "?" in uri or "@" in uri.partition("://")[2].partition("/")[0] else uri


def parse_model_uri(uri: str) -> ModelURI:
    """Parse and validate a model URI; the error names what is wrong and shows a correct form."""
    if not isinstance(uri, str) or not uri.strip():
        raise GearshiftError("model uri is empty: use pvc://, file://, https:// or hf://")
    uri = uri.strip()
    shown = _shown(uri)
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise GearshiftError(f"model uri {shown!r} has no scheme: use pvc://, file://, https:// or hf://")
    if any(c.isspace() for c in rest) or not rest:
        raise GearshiftError(f"model uri {shown!r} is malformed")
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        if not _DNS_LABEL.fullmatch(claim) or len(claim) > 253:
            raise GearshiftError(f"model uri {shown!r}: {claim!r} is not a valid PersistentVolumeClaim name")
        if not path or ".." in path.split("/"):
            raise GearshiftError(f"model uri {shown!r}: name the path inside the claim, e.g. pvc://models/m.gguf")
        return ModelURI(uri, "pvc", path.strip("/"), claim=claim)
    if scheme == "file":
        if not rest.startswith("/") or ".." in rest.split("/"):
            raise GearshiftError(f"model uri {shown!r}: file:// needs an absolute path, e.g. file:///models/m.gguf")
        return ModelURI(uri, "file", rest)
    if scheme in ("https", "http"):
        host, _, path = rest.partition("/")
        path = path.split("?", 1)[0].split("#", 1)[0]
        if not host or not path or path.endswith("/"):
            raise GearshiftError(f"model uri {shown!r}: name a file, e.g. https://host/path/model.gguf")
        return ModelURI(uri, scheme, "/" + path)  # type: ignore[arg-type]
    if scheme == "hf":
        body, _, revision = rest.partition("@")
        parts = body.strip("/").split("/")
        if len(parts) < 2 or not all(_HF_PART.fullmatch(p) for p in parts) or (revision == "" and "@" in rest):
            raise GearshiftError(f"model uri {shown!r}: use hf://org/repo[/file][@revision]")
        path = "/".join(parts[2:])
        repo_id = "/".join(parts[:2])
        if not path and parts[1].lower().endswith("-gguf"):
            raise GearshiftError(
                f"model uri {shown!r}: a GGUF repository holds several files; name one, "
                f"e.g. hf://{repo_id}/model-Q4_K_M.gguf"
            )
        return ModelURI(uri, "hf", path, repo_id=repo_id, revision=revision or None)
    raise GearshiftError(f"model uri {shown!r}: unknown scheme {scheme!r}; use pvc://, file://, https:// or hf://")


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uri", help="pvc://claim/path, file:///path, https://host/file, hf://org/repo[/file][@rev]")
    parser.add_argument("dir", help="directory to place the model in")
    parser.add_argument("--sha256", default=None, help="expected sha256 of the file (hex)")
    parser.add_argument("--retries", type=int, default=5, help="attempts for an interrupted download")
    parser.add_argument("--ca-file", default=None,
                        help="PEM bundle of a private CA to trust for https:// (besides the public roots)")


def run(args: argparse.Namespace) -> int:
    if args.sha256 is not None and not _SHA256.fullmatch(args.sha256.lower()):
        raise GearshiftError(f"--sha256 must be 64 hex digits, got {args.sha256!r}")
    path = fetch(args.uri, Path(args.dir), sha256=args.sha256, retries=args.retries, ca_file=args.ca_file)
    log(f"model ready at {path}")
    return 0


def fetch(uri: str, target_dir: Path, sha256: str | None = None, retries: int = 5,
          ca_file: str | None = None) -> Path:
    """Bring the model at `uri` into `target_dir`; returns the model's local path."""
    m = parse_model_uri(uri)
    if m.scheme == "pvc":
        log(f"{uri}: on a mounted volume, nothing to fetch")
        return target_dir / m.path
    target_dir.mkdir(parents=True, exist_ok=True)
    dest = target_dir / m.local_name
    if m.scheme == "file":
        return _copy(Path(m.path), dest, sha256)
    if m.scheme in ("https", "http"):
        return fetch_url(uri, dest, sha256, retries, _verify, ca_file)
    return _hf(m, target_dir, sha256)


def _copy(src: Path, dest: Path, sha256: str | None) -> Path:
    if not src.exists():
        raise GearshiftError(f"{src} does not exist")
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return dest
    if dest.exists() and dest.stat().st_size == src.stat().st_size and _matches(dest, sha256):
        log(f"{dest} already present")
        return dest
    tmp = dest.with_name(dest.name + ".part")
    shutil.copyfile(src, tmp)
    _verify(tmp, sha256)
    os.replace(tmp, dest)
    return dest


def _matches(path: Path, sha256: str | None) -> bool:
    return sha256 is None or _sha256_of(path) == sha256.lower()


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, sha256: str | None) -> None:
    if sha256 is None:
        return
    got = _sha256_of(path)
    if got != sha256.lower():
        path.unlink(missing_ok=True)  # a corrupt partial must not be resumed
        raise GearshiftError(f"checksum mismatch for {path.name.removesuffix('.part')}: expected sha256 {sha256.lower()}, got {got}")
    log(f"sha256 verified ({got[:12]}...)")


def _link(src: Path, dest: Path) -> None:
    """`dest` names the same file as `src` (a hard link; a relative symlink where links are refused)."""
    if dest.exists() and os.path.samefile(src, dest):
        return
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        os.symlink(os.path.relpath(src, dest.parent), tmp)
    os.replace(tmp, dest)


def _hf(m: ModelURI, target_dir: Path, sha256: str | None) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a dependency of the package
        raise GearshiftError("hf:// needs huggingface_hub installed") from None
    token = os.environ.get("HF_TOKEN") or None
    try:
        if m.path:
            local = huggingface_hub.hf_hub_download(
                m.repo_id, m.path, revision=m.revision, local_dir=target_dir, token=token
            )
            dest = target_dir / m.local_name
            if Path(local) != dest:  # a file in a sub-folder of the repo: also at the top, where the pod
                _link(Path(local), dest)  # looks; left in place, hf_hub_download finds it on the next start
            _verify(dest, sha256)
            return dest
        dest = target_dir / m.local_name
        huggingface_hub.snapshot_download(m.repo_id, revision=m.revision, local_dir=dest, token=token)
        return dest
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GearshiftError(f"download of {m.uri} failed: {first}") from None
