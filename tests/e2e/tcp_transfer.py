"""Helper run inside lab namespaces: a TCP transfer with a checksum at both ends.

    tcp_transfer.py server ADDR PORT        prints "<bytes> <sha256>" after EOF
    tcp_transfer.py client ADDR PORT BYTES  prints "<bytes> <sha256>" of what it sent"""
import hashlib
import os
import socket
import sys

mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in addr else socket.AF_INET
h = hashlib.sha256()
total = 0
if mode == "server":
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1)
    print("listening", flush=True)
    conn, _ = srv.accept()
    while chunk := conn.recv(65536):
        h.update(chunk)
        total += len(chunk)
else:
    size = int(sys.argv[4])
    conn = socket.create_connection((addr, port), timeout=20)
    while total < size:
        chunk = os.urandom(min(65536, size - total))
        conn.sendall(chunk)
        h.update(chunk)
        total += len(chunk)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
print(total, h.hexdigest(), flush=True)
