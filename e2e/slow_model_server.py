"""A model file server for a test pod (mounted from a ConfigMap, run by the image's python3): serves one
directory with Range support, at a limited rate so a download can be interrupted, and logs each request's
Range header. `python3 slow_model_server.py DIR PORT BYTES_PER_S [CERT KEY]` (with CERT and KEY: HTTPS).
Standard library only."""

import os
import ssl
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT, PORT, RATE = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ETAG = '"e2e-1"'
CHUNK = 64 * 1024


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        path = os.path.join(ROOT, os.path.basename(self.path))
        if not os.path.isfile(path):
            self.send_error(404)
            return
        size = os.path.getsize(path)
        rng = self.headers.get("Range", "")
        start = 0
        if rng.startswith("bytes=") and self.headers.get("If-Range", ETAG) == ETAG:
            start = int(rng[6:].split("-")[0])
        print(f"GET {self.path} range={rng or '-'} start={start}", flush=True)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(size - start))
        self.send_header("ETag", ETAG)
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            while chunk := f.read(CHUNK):
                self.wfile.write(chunk)
                time.sleep(len(chunk) / RATE)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


httpd = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
if len(sys.argv) > 5:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(sys.argv[4], sys.argv[5])
    httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
httpd.serve_forever()
