"""Serve model files over plain HTTP on 127.0.0.1, so an InferenceService can use an http:// model URI
and its pods' init container really downloads the model (the machine has no internet)."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        self.server.requests.append(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}")


class ModelServer:
    """`with ModelServer(dir) as s: s.url("file.gguf")` -> http://127.0.0.1:PORT/file.gguf"""

    def __init__(self, directory: Path, host: str = "127.0.0.1"):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = ThreadingHTTPServer((host, 0), handler)
        self.httpd.requests = []  # type: ignore[attr-defined]  # what was asked, for failure reports
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="model-server", daemon=True)

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests  # type: ignore[attr-defined]

    def url(self, name: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def __enter__(self) -> ModelServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
