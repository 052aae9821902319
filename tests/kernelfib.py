"""The kernel as the oracle of route selection, for differential tests.

`KernelFib(ns).match_many(dests)` asks a namespace's kernel which route each
destination takes, as `ip route get fibmatch` does (RTM_GETROUTE with
RTM_F_FIB_MATCH: the matched route's prefix, type, gateway and device), and
`dataplane_match` asks the loaded XDP program the same through a probe
(BPF_PROG_TEST_RUN, as `bpfrouter route get`). Both give a `Match`, so a test
compares them without any route-selection rule of its own.

The requests go out in batches over one raw netlink socket (a few
microseconds each) rather than through pyroute2 (about a millisecond each),
so a test can afford thousands of destinations."""
from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

from bpfrouter import netns
from bpfrouter.datapath import layout as lo
from bpfrouter.observe import probe

RTM_NEWROUTE, RTM_GETROUTE, NLMSG_ERROR = 24, 26, 2
NLM_F_REQUEST = 0x1
RTM_F_FIB_MATCH, RTM_F_LOOKUP_TABLE = 0x2000, 0x1000
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_MULTIPATH, RTA_TABLE, RTA_VIA, RTA_ENCAP_TYPE = 1, 4, 5, 9, 15, 18, 21
RTA_SRC, RTA_IIF, RTA_MARK, RTA_IP_PROTO, RTA_SPORT, RTA_DPORT = 2, 3, 16, 27, 28, 29
SO_RCVBUFFORCE = 33
# a route of an error type answers with the error, not the route (no prefix)
KERNEL_ERRORS = {22: "blackhole", 113: "unreachable", 13: "prohibit", 101: "none"}
KERNEL_TYPES = {1: "unicast", 2: "local", 3: "local", 4: "local"}  # broadcast, anycast: delivered locally

_hdr = struct.Struct("=IHHII")
_rtmsg = struct.Struct("=BBBBBBBBI")
_rta = struct.Struct("=HH")


class Match(NamedTuple):
    """Which route a destination takes. prefix is None where the kernel does not
    say (error routes); gateway and oif only for a single-path unicast route."""
    kind: str                 # unicast, local, blackhole, unreachable, prohibit, multipath, none
    prefix: str | None = None
    gateway: str | None = None
    oif: int = 0
    table: int | None = None  # input lookups (match_input): the table the route is in

    def agrees(self, other: Match) -> bool:
        """Equal, leaving the prefix and table out where either side does not know them."""
        a, b = self, other
        if a.table is None or b.table is None:
            a, b = a._replace(table=None), b._replace(table=None)
        if a.prefix is None or b.prefix is None:
            return a._replace(prefix=None) == b._replace(prefix=None)
        return a == b


class Packet(NamedTuple):
    """What an input route lookup sees of a packet (`ip route get ... iif`)."""
    dst: str
    src: str
    iif: int
    mark: int = 0
    tos: int = 0
    proto: int = 17
    sport: int = 0
    dport: int = 0


class KernelFib:
    """A netlink socket in network namespace `ns` (None: the current one)."""

    BATCH = 256

    def __init__(self, ns: str | None = None):
        if ns:
            with netns.entered(ns):
                self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        else:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        self.sock.bind((0, 0))
        self.seq = 0
        self.buf = bytearray(1 << 16)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def match_many(self, dests) -> list[Match]:
        out: list[Match] = []
        for i in range(0, len(dests), self.BATCH):
            out += self._batch([ipaddress.ip_address(d) for d in dests[i:i + self.BATCH]])
        return out

    def match(self, dst) -> Match:
        return self.match_many([dst])[0]

    def match_input(self, packets: list[Packet]) -> list[Match]:
        """The route each packet takes on input (RTM_GETROUTE with RTA_IIF and
        the flow's fields, as `ip route get ... iif ... fibmatch`), with its table."""
        out: list[Match] = []
        for i in range(0, len(packets), self.BATCH):
            out += self._batch([ipaddress.ip_address(p.dst) for p in packets[i:i + self.BATCH]],
                               packets[i:i + self.BATCH])
        return out

    def _batch(self, dests, packets=None) -> list[Match]:
        first = self.seq + 1
        req = bytearray()
        for i, d in enumerate(dests):
            self.seq += 1
            family = socket.AF_INET if d.version == 4 else socket.AF_INET6
            attr = _rta.pack(4 + len(d.packed), RTA_DST) + d.packed
            tos, flags = 0, RTM_F_FIB_MATCH
            if packets is not None:
                flags |= RTM_F_LOOKUP_TABLE
                p = packets[i]
                src = ipaddress.ip_address(p.src).packed
                attr += _rta.pack(4 + len(src), RTA_SRC) + src + _rta.pack(8, RTA_IIF) + struct.pack("=I", p.iif)
                attr += _rta.pack(8, RTA_MARK) + struct.pack("=I", p.mark)
                attr += _rta.pack(5, RTA_IP_PROTO) + bytes([p.proto, 0, 0, 0])
                if p.proto in (6, 17):
                    attr += _rta.pack(6, RTA_SPORT) + struct.pack("!H", p.sport) + b"\0\0"
                    attr += _rta.pack(6, RTA_DPORT) + struct.pack("!H", p.dport) + b"\0\0"
                tos = p.tos
            body = _rtmsg.pack(family, d.max_prefixlen, 0, tos, 0, 0, 0, 0, flags) + attr
            req += _hdr.pack(16 + len(body), RTM_GETROUTE, NLM_F_REQUEST, self.seq, 0) + body
        self.sock.send(req)
        got: dict[int, Match] = {}
        while len(got) < len(dests):
            n = self.sock.recv_into(self.buf)
            buf = bytes(self.buf[:n])
            off = 0
            while off + 16 <= n:
                length, mtype, _, seq, _ = _hdr.unpack_from(buf, off)
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", buf, off + 16)[0]
                    got[seq] = Match(KERNEL_ERRORS.get(code, f"error {code}"))
                elif mtype == RTM_NEWROUTE:
                    got[seq] = _decode(buf, off, length)
                off += (length + 3) & ~3
        return [got[s] for s in range(first, first + len(dests))]


def _decode(buf: bytes, off: int, length: int) -> Match:
    family, dst_len, _, _, table, _, _, rtype, _ = _rtmsg.unpack_from(buf, off + 16)
    dst = gw = None
    oif = 0
    multipath = encap = False
    pos, end = off + 28, off + length
    while pos + 4 <= end:
        alen, atype = _rta.unpack_from(buf, pos)
        if alen < 4:
            break
        value = buf[pos + 4:pos + alen]
        if atype == RTA_DST:
            dst = value
        elif atype == RTA_OIF:
            oif = struct.unpack("=I", value)[0]
        elif atype == RTA_GATEWAY:
            gw = value
        elif atype == RTA_VIA:
            gw = value[2:]
        elif atype == RTA_MULTIPATH:
            multipath = True
        elif atype == RTA_ENCAP_TYPE:
            encap = True
        elif atype == RTA_TABLE:
            table = struct.unpack("=I", value)[0]
        pos += (alen + 3) & ~3
    width = 32 if family == socket.AF_INET else 128
    raw = int.from_bytes(dst, "big") if dst else 0
    prefix = str((ipaddress.IPv4Network if width == 32 else ipaddress.IPv6Network)((raw, dst_len)))
    kind = KERNEL_TYPES.get(rtype, f"type {rtype}")
    if kind == "unicast" and encap:  # the fast path passes it: only the kernel encapsulates
        return Match("kernel", prefix, table=table)
    if kind == "unicast" and multipath:
        return Match("multipath", prefix, table=table)
    if kind != "unicast":
        return Match(kind, prefix, table=table)
    return Match(kind, prefix, str(ipaddress.ip_address(gw)) if gw else None, oif, table)


def dataplane_match(dp, dst, iif: int, iif_mac: bytes) -> Match:
    """The loaded program's decision for a UDP probe to dst arriving on iif.
    The route type and next hop come from the entry the lookup walked to (for
    IPv4, the compressed root); the prefix from the matched leaf."""
    d = probe(dp, dst, iif, iif_mac)
    if d.route_type is None:
        return Match("none" if d.reason == lo.Reason.PASS_FIB_MISS else f"reason {d.reason.label}")
    if d.route_type != "unicast":
        return Match(d.route_type, d.prefix)
    return Match("unicast", d.prefix, d.gateway, d.egress_ifindex)


def differences(kernel: KernelFib, dp, dests, iif: int, iif_mac: bytes, dp_ns: str | None = None) -> list[str]:
    """The destinations where the program and the kernel disagree, described.
    dp_ns: the namespace to run the probes in (the data plane's interfaces')."""
    want = kernel.match_many(dests)
    if dp_ns:
        with netns.entered(dp_ns):
            got = [dataplane_match(dp, d, iif, iif_mac) for d in dests]
    else:
        got = [dataplane_match(dp, d, iif, iif_mac) for d in dests]
    return [f"{d}: kernel {k}, data plane {g}" for d, k, g in zip(dests, want, got, strict=True) if not k.agrees(g)]
