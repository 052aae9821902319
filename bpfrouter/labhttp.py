"""HTTP for the load balancer's lab (the demo and the end-to-end tests), run
inside lab namespaces:

    python -m bpfrouter.labhttp serve NAME PORT
        answers every GET with NAME and a newline, every POST with NAME and
        the byte count of its body; keep-alive, many at once
    python -m bpfrouter.labhttp hold URL N
        opens N keep-alive connections and GETs URL on each, prints the
        answers as a JSON list; then, for each line read from stdin, GETs
        again on the same connections and prints those answers (an error
        text where one failed): a connection that moved to another backend
        fails, as its TCP state is not there."""
from __future__ import annotations

import http.client
import json
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(name: str, port: int) -> None:
    body = (name + "\n").encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, text: bytes):
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def do_GET(self):
            self.answer(body)

        def do_POST(self):
            got = len(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            self.answer(f"{name} {got}\n".encode())

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        address_family = __import__("socket").AF_INET6
        daemon_threads = True
        request_queue_size = 1024

        def server_bind(self):
            import socket
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

        def handle_error(self, request, client_address):
            """A client that went away (a reset, a closed pipe) is no error
            worth a traceback; anything else is one line."""
            err = sys.exc_info()[1]
            if not isinstance(err, (ConnectionResetError, BrokenPipeError)):
                print(f"labhttp: {client_address[0]}: {type(err).__name__}: {err}", file=sys.stderr)

    srv = Server(("::", port), Handler)
    print("listening", flush=True)
    srv.serve_forever()


def hold(url: str, n: int) -> None:
    u = urllib.parse.urlsplit(url)
    conns = [http.client.HTTPConnection(u.hostname, u.port or 80, timeout=5) for _ in range(n)]

    def round_() -> list[str]:
        out = []
        for c in conns:
            try:
                c.request("GET", u.path or "/")
                out.append(c.getresponse().read().decode().strip())
            except (OSError, http.client.HTTPException) as e:
                out.append(f"error: {type(e).__name__}")
        return out

    print(json.dumps(round_()), flush=True)
    for _ in sys.stdin:
        print(json.dumps(round_()), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "hold":
        hold(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"usage: {sys.argv[0]} serve NAME PORT | hold URL N")
