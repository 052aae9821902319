"""Helper run inside a lab namespace: an ICMP echo flood that runs until told
to stop and accounts for every request, in flight ones included.

    icmp_flood.py DST [WINDOW]

Keeps WINDOW echo requests outstanding (each reply sends the next; the
sequence number is 64 bits, in the payload); a request unanswered for SLOT_S
gives its slot to a new one, so a loss does not stall the flood, but it is
still awaited. Prints "started" once the first
reply is back. Commands on stdin, one per line:
    count   prints the number of replies so far
    stop    stops sending, waits for the outstanding replies (up to DRAIN_S
            for a lost one) and prints {"sent", "received", "duplicates",
            "lost"} as JSON, then exits

ping -f cannot do this: stopped with SIGINT, it counts the request in flight
as lost; given a count, it ends when the host's speed says so."""
import json
import os
import select
import socket
import struct
import sys
import time

DRAIN_S = 5.0
SLOT_S = 1.0
ECHO_REQUEST, ECHO_REPLY = 8, 0


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def request(ident: int, seq: int) -> bytes:
    payload = struct.pack("!Q", seq) + bytes(48)  # 56 bytes, as ping's
    head = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq & 0xFFFF)
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, checksum(head + payload), ident, seq & 0xFFFF) + payload


def main() -> None:
    dst, window = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    ident = os.getpid() & 0xFFFF
    outstanding: dict[int, float] = {}  # sequence -> when sent
    overdue: set[int] = set()           # unanswered after SLOT_S: out of the window, still awaited
    next_seq = received = duplicates = 0
    started = stopping = False
    deadline = 0.0
    stdin = b""
    while True:
        now = time.monotonic()
        for seq in [q for q, t in outstanding.items() if now - t > SLOT_S]:
            del outstanding[seq]
            overdue.add(seq)
        while not stopping and len(outstanding) < window:
            sock.sendto(request(ident, next_seq), (dst, 0))
            outstanding[next_seq] = now
            next_seq += 1
        if stopping and (not (outstanding or overdue) or now > deadline):
            print(json.dumps({"sent": next_seq, "received": received, "duplicates": duplicates,
                              "lost": sorted(set(outstanding) | overdue)[:20]}), flush=True)
            return
        ready, _, _ = select.select([sock, 0], [], [], 0.5)
        if sock in ready:
            pkt = sock.recv(2048)
            ihl = (pkt[0] & 0x0F) * 4
            kind, _, _, rid = struct.unpack_from("!BBHH", pkt, ihl)
            if kind == ECHO_REPLY and rid == ident and len(pkt) >= ihl + 16:
                seq = struct.unpack_from("!Q", pkt, ihl + 8)[0]
                if seq in outstanding or seq in overdue:
                    outstanding.pop(seq, None)
                    overdue.discard(seq)
                    received += 1
                    if not started:
                        started = True
                        print("started", flush=True)
                else:
                    duplicates += 1
        if 0 in ready:
            chunk = os.read(0, 4096)
            stdin += chunk if chunk else b"stop\n"
            while b"\n" in stdin:
                line, stdin = stdin.split(b"\n", 1)
                if line == b"count":
                    print(received, flush=True)
                elif line == b"stop" and not stopping:
                    stopping, deadline = True, time.monotonic() + DRAIN_S


if __name__ == "__main__":
    main()
