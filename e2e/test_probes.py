"""The node agent's probes against a real HTTP server and a real closed port, and the thresholds that turn
attempts into a Ready / not-Ready decision."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from gearshift.e2e.node.podspec import Launch
from gearshift.e2e.node.probes import ProbeState, probe_once


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/ready" else 503)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_http_tcp_and_exec_probes(server: int):
    run = Launch(name="c", argv=[], env={"PATH": "/usr/bin:/bin"}, cwd="/", ports={"http": server})
    assert probe_once({"httpGet": {"path": "/ready", "port": "http"}}, run, "127.0.0.1", [])
    assert not probe_once({"httpGet": {"path": "/other", "port": server}}, run, "127.0.0.1", [])
    assert probe_once({"tcpSocket": {"port": server}}, run, "127.0.0.1", [])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert not probe_once({"tcpSocket": {"port": closed}}, run, "127.0.0.1", [])
    assert probe_once({"exec": {"command": ["true"]}}, run, "127.0.0.1", [])
    assert not probe_once({"exec": {"command": ["false"]}}, run, "127.0.0.1", [])


def test_thresholds_and_pacing():
    st = ProbeState(spec={"failureThreshold": 2, "successThreshold": 2, "periodSeconds": 5,
                          "initialDelaySeconds": 3}, started_at=100.0)
    assert not st.due(101.0) and st.due(103.0)
    assert st.record(True, 103.0) is None  # one success of two: undecided
    assert not st.due(107.0) and st.due(108.0)
    assert st.record(True, 108.0) is True
    assert st.record(False, 113.0) is True  # one failure of two: still ready
    assert st.record(False, 118.0) is False
