"""Health checks (bpfrouter/lb/health.py) against real servers on loopback:
each kind of probe, and rise/fall turning a backend unhealthy and back."""
from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from bpfrouter.lb.health import HealthMonitor, probe
from bpfrouter.lb.service import Check


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ok" else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass
    srv = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def udp_echo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                data, peer = s.recvfrom(2048)
            except OSError:
                return
            s.sendto(b"pong:" + data, peer)
    threading.Thread(target=serve, daemon=True).start()
    yield s.getsockname()[1]
    s.close()


def test_http(http_server):
    assert probe(Check("http", path="/ok"), "127.0.0.1", http_server) == (True, "HTTP 200")
    assert probe(Check("http", path="/bad"), "127.0.0.1", http_server) == (False, "HTTP 503")
    assert probe(Check("http", path="/bad", status=503), "127.0.0.1", http_server)[0]


def test_tcp(http_server):
    assert probe(Check("tcp"), "127.0.0.1", http_server)[0]
    ok, seen = probe(Check("tcp", timeout=0.5), "127.0.0.1", free_port())
    assert not ok and "refused" in seen.lower()


def test_udp(udp_echo):
    assert probe(Check("udp", payload="ping", expect="pong"), "127.0.0.1", udp_echo)[0]
    assert probe(Check("udp", payload="ping", expect="other"), "127.0.0.1", udp_echo) == (False, "unexpected reply")
    assert not probe(Check("udp", payload="ping", timeout=0.2), "127.0.0.1", free_port())[0]


def test_exec():
    assert probe(Check("exec", command='sh -c "test $BACKEND = 127.0.0.1 && test $PORT = 7"'), "127.0.0.1", 7)[0]
    assert probe(Check("exec", command="false"), "127.0.0.1", 7) == (False, "exit 1")
    assert probe(Check("exec", command="sleep 5", timeout=0.2), "127.0.0.1", 7) == (False, "timed out")
    assert not probe(Check("exec", command="/nonexistent/check"), "127.0.0.1", 7)[0]


def test_fall_and_rise():
    """A listener that goes away: `fall` failed probes make the backend
    unhealthy, `rise` good ones after it returns make it healthy."""
    port = free_port()
    changes: list[bool] = []
    changed = threading.Event()

    def on_change(t):
        changes.append(t.healthy)
        changed.set()
    mon = HealthMonitor(on_change)
    lsock = socket.create_server(("127.0.0.1", port))
    try:
        mon.watch("svc", "127.0.0.1", port, Check("tcp", interval=0.05, timeout=0.5, rise=2, fall=2))
        assert mon.healthy("svc", "127.0.0.1")
        lsock.close()
        assert changed.wait(10) and changes == [False]
        assert not mon.healthy("svc", "127.0.0.1")
        changed.clear()
        lsock = socket.create_server(("127.0.0.1", port))
        assert changed.wait(10) and changes == [False, True]
        mon.unwatch("svc")
        assert mon.healthy("svc", "127.0.0.1"), "an unwatched backend is not held unhealthy"
    finally:
        mon.stop_all()
        lsock.close()
