"""The frame differential: one corpus of Ethernet frames sent through the
lab router twice, once forwarded by the kernel alone and once with bpfrouter's
XDP program attached, and what comes out compared frame by frame.

    h1 (sender, sink) -- r (router) -- h2 (sink, MTU 1300)

A frame is sent from h1-eth0 with an AF_PACKET socket, followed by sentinels
(below); everything that arrives at h2-eth0 (forwarded frames, fragments) and
back at h1-eth0 (ICMP errors, echo replies, ARP replies) up to the sentinels
is that frame's outcome. AF_PACKET taps see a frame before the hosts' own
stacks. The hosts do not answer: nothing is addressed to them (they do not
forward, so what is addressed beyond h2 is dropped silently), except frames
from h1 to h1, which h1 answers to itself. So the outcome is the router's.

Determinism, which the comparison needs:
- the router's neighbours are permanent (no ARP or ND, nothing queued on a
  neighbour), and the corpus never addresses an unresolved neighbour nor
  sends a fragment to the router itself (a reassembly timeout or a failed
  resolution would answer seconds later, into another frame's window);
- the router's ICMP rate limits are off (peer and global, both families) and
  IPv4 redirects are off (rate-limited by their own backoff);
- the hosts receive through an XDP_PASS program with GRO off: their veths run
  NAPI (which XDP redirects into a veth need) without GRO holding TCP
  segments back, so frames reach the capture in the order they were queued.

The sentinels (SENTINELS_*), sent after each frame from the same CPU: UDP
to beyond h2 and UDP from h1 to h1 (both forwarded, by XDP when it runs) and
UDP with TTL 1 (the kernel answers time exceeded). The frame's own outputs
are queued ahead of theirs on each path (the kernel's outputs at once, XDP
redirects in the same bulk queue, in order), so once the sentinels' frames
are read at both hosts, the frame's outcome is complete. Where the router may
not forward (the sysctl phases), echo requests to the router close the
window instead: everything runs in softirq on the one CPU, so the redirects
of a poll are flushed before a host's receive poll runs.

run_differential: the corpus through the kernel, then through bpfrouter,
then some of its frames again with forwarding sysctls off (SYSCTL_PHASES),
bpfrouter restarted for each. traits(): what is unusual about a frame, read
from its bytes, which names the class of a divergence."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from scapy.layers.inet import GRE, ICMP, IP, IPOption_NOP, IPOption_Router_Alert, IPOption_RR, IPOption_Timestamp, \
    TCP, UDP, fragment
from scapy.layers.ipsec import AH
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6ND_NS, IPv6, IPv6ExtHdrDestOpt,
                                IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrSegmentRouting,
                                HBHOptUnknown, Pad1, PadN, RouterAlert)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from bpfrouter import netns
from bpfrouter.bpf import BpfObject, Link, XDP_FLAGS_DRV_MODE
from bpfrouter.lab import Lab
from bpfrouter.packet import inet_checksum

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33
TAG = b"FDIF"              # corpus id follows, 4 bytes
SENTINEL = b"SNTL"         # window number follows
# What the sentinels make arrive where: UDP forwarded to beyond h2, UDP from h1
# to h1 (back out of its port), UDP with TTL 1 (time exceeded back), an echo
# request to the router (reply to h1) and an IPv6 one from h2's address (reply
# to h2). A frame's outputs are complete when the first three have arrived, or
# where the router must not forward, the last two.
SENTINELS_FORWARDED = {("h2", "forward"), ("h1", "hairpin"), ("h1", "ttl")}
SENTINELS_LOCAL = {("h1", "echo4"), ("h2", "echo6")}
EGRESS_MTU = 1300          # r-eth1 and h2-eth0

H1, H2, R1, R2 = "10.0.1.2", "10.0.2.2", "10.0.1.1", "10.0.2.1"
H1_6, H2_6, R1_6, R2_6 = "fd00:1::2", "fd00:2::2", "fd00:1::1", "fd00:2::1"
BEYOND, BEYOND6 = ipaddress.ip_network("10.99.0.0/16"), ipaddress.ip_network("fd00:99::/64")
# Routes of the router besides the lab's: beyond h2, and one of each error type.
ROUTES = [f"{BEYOND} via {H2}", f"{BEYOND6} via {H2_6}",
          "unreachable 10.98.1.0/24", "prohibit 10.98.2.0/24", "blackhole 10.98.3.0/24",
          "unreachable fd00:98:1::/64", "prohibit fd00:98:2::/64", "blackhole fd00:98:3::/64"]
CONNECTED = [ipaddress.ip_network(n) for n in ("10.0.1.0/24", "10.0.2.0/24", "fd00:1::/64", "fd00:2::/64")]
ROUTER_ADDRS = {ipaddress.ip_address(a) for a in (R1, R2, R1_6, R2_6)}
# IPv4 sources of the corpus, one after the other: the kernel limits the ICMP
# errors of unreachable destinations per source (ip_error: one a second, a
# burst of 5, by net.ipv4.route.error_cost, a global sysctl), so no source may
# send many. They are h1's (permanent neighbours with h1's MAC, so h1 hears
# the answers; h1 itself does not own them, so it never replies).
SOURCES4 = [f"10.0.1.{i}" for i in range(10, 250)]
# neighbours the router knows (permanent); other connected addresses would be resolved, slowly
NEIGHBORS = {ipaddress.ip_address(a) for a in (H1, H2, H1_6, H2_6, *SOURCES4)}
SYSCTLS = {
    "net.ipv4.icmp_ratelimit": "0", "net.ipv4.icmp_ratemask": "0",
    "net.ipv4.icmp_msgs_per_sec": "1000000", "net.ipv4.icmp_msgs_burst": "1000000",
    "net.ipv6.icmp.ratelimit": "0",
    "net.ipv4.conf.all.send_redirects": "0", "net.ipv4.conf.r-eth0.send_redirects": "0",
    "net.ipv4.conf.r-eth1.send_redirects": "0",
    # strict reverse-path filtering, as on a distribution's router (systemd sets 2, loose)
    "net.ipv4.conf.all.rp_filter": "1",
}


# Runs besides the first, each with sysctls of the router changed (and put back
# after): the name is the trait every divergence of the run gets.
SYSCTL_PHASES = {
    "ipv4-forwarding-off-ingress": {"net.ipv4.conf.r-eth0.forwarding": ("0", "1")},
    "ipv4-forwarding-off-egress": {"net.ipv4.conf.r-eth1.forwarding": ("0", "1")},
    "ip-forward-off": {"net.ipv4.ip_forward": ("0", "1")},
    "ipv6-forwarding-off": {"net.ipv6.conf.all.forwarding": ("0", "1")},
    "ipv6-forwarding-off-ingress": {"net.ipv6.conf.r-eth0.forwarding": ("0", "1")},
}


@dataclass
class Case:
    id: int
    desc: str
    frame: bytes
    routable: bool = False     # a plain frame the fast path itself should forward

    @property
    def traits(self) -> frozenset[str]:
        return traits(self.frame)


@dataclass
class Outcome:
    at_h2: list[bytes] = field(default_factory=list)   # frames forwarded to h2
    at_h1: list[bytes] = field(default_factory=list)   # frames sent back to h1

    def key(self) -> tuple:
        return (tuple(sorted(normalise(f) for f in self.at_h2)), tuple(sorted(normalise(f) for f in self.at_h1)))


# ---------------------------------------------------------------- the corpus

def _tag(i: int, size: int = 16) -> bytes:
    return (TAG + struct.pack("!I", i) + bytes(range(256)) * 8)[:max(size, 8)]


class CorpusBuilder:
    def __init__(self, rng: random.Random, r_mac: str, h1_mac: str):
        self.rng, self.r_mac, self.h1_mac = rng, r_mac, h1_mac
        self.cases: list[Case] = []

    def eth(self, dst: str | None = None):
        return Ether(src=self.h1_mac, dst=dst or self.r_mac)

    def add(self, desc: str, pkt, routable: bool = False, raw: bytes | None = None) -> None:
        self.cases.append(Case(len(self.cases), desc, raw if raw is not None else bytes(pkt), routable))

    def payload(self, size: int = 16) -> Raw:
        """The tag of the case being built: every builder adds one case, after
        building its frame, so that case's id is the next one."""
        return Raw(_tag(len(self.cases), size))

    def dst4(self) -> str:
        return str(BEYOND.network_address + self.rng.randrange(1, 65534))

    def dst6(self) -> str:
        return str(BEYOND6.network_address + self.rng.randrange(1, 1 << 32))

    def l4(self, version: int, kind: str, size: int):
        r = self.rng
        if kind == "tcp":
            return TCP(sport=r.randrange(1024, 65535), dport=r.choice([22, 80, 443, r.randrange(1, 65535)]),
                       flags=r.choice(["S", "SA", "A", "PA", "FA", "R", ""]), seq=r.getrandbits(32)) / \
                self.payload(size)
        if kind == "udp":
            return UDP(sport=r.randrange(1024, 65535), dport=r.choice([53, 123, r.randrange(1, 65535)])) / \
                self.payload(size)
        if version == 4:
            return ICMP(type=8, id=r.getrandbits(16), seq=r.getrandbits(16)) / self.payload(size)
        return ICMPv6EchoRequest(id=r.getrandbits(16), seq=r.getrandbits(16)) / self.payload(size)

    def ip(self, v: int, dst: str | None = None, src: str | None = None, **kw):
        if v == 4:
            src = src or SOURCES4[len(self.cases) % len(SOURCES4)]
            return IP(src=src, dst=dst or self.dst4(), id=self.rng.getrandbits(16), **kw)
        return IPv6(src=src or H1_6, dst=dst or self.dst6(), fl=self.rng.getrandbits(20), **kw)

    def build(self, mutations: int, valid: int) -> list[Case]:
        r = self.rng
        kinds = ("tcp", "udp", "icmp")
        for _ in range(valid):
            v, k = r.choice((4, 6)), r.choice(kinds)
            ttl = r.randrange(2, 256)
            ip = self.ip(v, ttl=ttl) if v == 4 else self.ip(v, hlim=ttl)
            self.add(f"valid IPv{v} {k} ttl {ttl}", self.eth() / ip / self.l4(v, k, r.randrange(8, 1200)),
                     routable=True)
        for v in (4, 6):
            for k in kinds:
                self.edge_cases(v, k)
        self.ipv4_cases()
        self.ipv6_cases()
        self.l2_cases()
        bases = [c for c in self.cases if c.routable]
        n = 0
        while n < mutations:
            base = r.choice(bases)
            frame = mutate(r, base.frame)
            if not safe(frame):
                continue
            # re-tagged (the L4 checksum, no router's business, goes wrong with it)
            frame = frame.replace(TAG + struct.pack("!I", base.id), TAG + struct.pack("!I", len(self.cases)))
            self.add(f"mutation {n} of #{base.id} ({base.desc})", None, raw=frame)
            n += 1
        return self.cases

    def edge_cases(self, v: int, k: str) -> None:
        fam = f"IPv{v} {k}"
        for ttl in (0, 1, 2):
            ip = self.ip(v, ttl=ttl) if v == 4 else self.ip(v, hlim=ttl)
            self.add(f"{fam} {'ttl' if v == 4 else 'hop limit'} {ttl}", self.eth() / ip / self.l4(v, k, 24),
                     routable=ttl == 2)
        # bad L4 checksum: not a router's business, forwarded
        pkt = self.eth() / self.ip(v) / self.l4(v, k, 24)
        pkt[2].chksum = 0x1234 if k != "icmp" or v == 4 else None
        if v == 6 and k == "icmp":
            pkt[2].cksum = 0x1234
        self.add(f"{fam} bad L4 checksum", pkt)
        # truncated L4: the IP packet ends inside the L4 header
        hl = 20 if v == 4 else 40
        for keep in (0, 2, 4, 7, 12, 19):
            full = bytes(self.ip(v) / self.l4(v, k, 24))  # this case's tag (where kept)
            if keep >= len(full) - hl:
                continue
            ip = (IP if v == 4 else IPv6)(full[:hl])
            del ip.payload
            if v == 4:
                ip.len, ip.chksum = None, None
            else:
                ip.plen = None
            self.add(f"{fam} truncated to {keep} bytes of L4", self.eth() / ip / Raw(full[hl:hl + keep]))
        # over the egress MTU, with and without DF (IPv6: never fragmented by routers)
        for size in (EGRESS_MTU - (20 if v == 4 else 40) - 8 - 20, EGRESS_MTU + 1, 1400):
            if v == 4:
                for df in (True, False):
                    pkt = self.eth() / self.ip(4, flags="DF" if df else 0) / self.l4(4, k, size - 28)
                    self.add(f"{fam} IP length {len(pkt) - 14} {'DF' if df else 'no DF'} (egress MTU {EGRESS_MTU})",
                             pkt, routable=len(pkt) - 14 <= EGRESS_MTU)
            else:
                pkt = self.eth() / self.ip(6) / self.l4(6, k, size - 48)
                self.add(f"{fam} IP length {len(pkt) - 14} (egress MTU {EGRESS_MTU})", pkt,
                         routable=len(pkt) - 14 <= EGRESS_MTU)
        # fragments: first, middle, last (forwarded as they are)
        if v == 4:
            frags = fragment(self.ip(4) / self.l4(4, k, 600), fragsize=256)
            for i, f in enumerate(frags):
                self.add(f"{fam} fragment {i + 1} of {len(frags)}", self.eth() / f)
        else:
            whole = self.ip(6) / IPv6ExtHdrFragment(id=self.rng.getrandbits(32)) / self.l4(6, k, 600)
            from scapy.layers.inet6 import fragment6
            frags = fragment6(whole, 300)
            for i, f in enumerate(frags):
                self.add(f"{fam} fragment {i + 1} of {len(frags)}", self.eth() / f)
        # to the router itself, to a route of each error type, to no route
        for dst, what in ((R2, "the router's far address"), ("10.98.1.5", "an unreachable route"),
                          ("10.98.2.5", "a prohibit route"), ("10.98.3.5", "a blackhole route"),
                          ("192.0.2.7", "no route")) if v == 4 else \
                ((R2_6, "the router's far address"), ("fd00:98:1::5", "an unreachable route"),
                 ("fd00:98:2::5", "a prohibit route"), ("fd00:98:3::5", "a blackhole route"),
                 ("2001:db8::7", "no route")):
            self.add(f"{fam} to {what} {dst}", self.eth() / self.ip(v, dst=dst) / self.l4(v, k, 24))
        # back out of the port it came from (redirects off: forwarded only)
        if v == 4:
            self.add(f"{fam} to h1, out of the port it came in",
                     self.eth() / self.ip(4, src=H1, dst=H1) / self.l4(4, k, 24))
        # trailing bytes after the IP packet (Ethernet padding of a short frame, or junk)
        pkt = bytes(self.eth() / self.ip(v) / self.l4(v, k, 8))
        padded = pkt.ljust(60, b"\0") if len(pkt) < 60 else pkt + b"\0" * 4
        self.add(f"{fam} with {len(padded) - len(pkt)} bytes after the IP packet", None, raw=padded)

    def ipv4_cases(self) -> None:
        e, p = self.eth, self.payload
        bad = self.eth() / self.ip(4) / UDP() / p()
        raw = bytearray(bytes(bad))
        raw[24] ^= 0x5A  # IPv4 header checksum
        self.add("IPv4 UDP bad header checksum", None, raw=bytes(raw))
        raw = bytearray(bytes(self.eth() / self.ip(4, ttl=1) / UDP() / p()))
        raw[24] ^= 0x5A
        self.add("IPv4 UDP ttl 1 bad header checksum", None, raw=bytes(raw))
        for src, what in (("0.0.0.0", "unspecified"), ("0.1.2.3", "0/8"), ("127.0.0.1", "loopback"),
                          ("224.0.0.5", "multicast"), ("240.0.0.1", "class E"), ("255.255.255.255", "broadcast"),
                          (R1, "the router's own (ingress)"), (R2, "the router's own (egress)"),
                          ("10.0.2.9", "h2's subnet (reverse path out of r-eth1)"),
                          ("10.99.3.3", "beyond h2 (reverse path out of r-eth1)"),
                          ("169.254.1.1", "link-local"), ("198.51.100.1", "no route back")):
            self.add(f"IPv4 UDP source {src} ({what})", e() / self.ip(4, src=src) / UDP() / p())
        for dst, what in (("0.1.2.3", "0/8"), ("127.0.0.1", "loopback"), ("240.0.0.1", "class E"),
                          ("255.255.255.255", "limited broadcast"), ("10.0.2.255", "directed broadcast"),
                          ("224.0.0.1", "all-hosts, unicast MAC"),
                          ("239.1.2.3", "multicast, unicast MAC")):
            self.add(f"IPv4 UDP destination {dst} ({what})", e() / self.ip(4, dst=dst) / UDP() / p())
        opts = {"record route": [IPOption_RR(routers=["0.0.0.0"] * 3)],
                "timestamp": [IPOption_Timestamp(flg=0, timestamp=0)],
                "router alert": [IPOption_Router_Alert()],
                "NOP padding": [IPOption_NOP()] * 4,
                "unknown option 0x9e": [Raw(b"\x9e\x04\x00\x00")],
                "option length 0": [Raw(b"\x07\x00\x00\x00")],
                "option length past the header": [Raw(b"\x07\x0c\x04\x00")],
                "loose source route": [Raw(b"\x83\x07\x04" + bytes(map(int, H2.split("."))) + b"\x00")]}
        for name, o in opts.items():
            self.add(f"IPv4 UDP option {name}", e() / self.ip(4, options=o) / UDP() / p())
        for name, fields in (("version 5", {"version": 5}), ("ihl 4", {"ihl": 4}), ("ihl 15", {"ihl": 15}),
                             ("total length beyond the frame", {"len": 200}), ("total length 19", {"len": 19}),
                             ("reserved flag", {"flags": "evil"}), ("DF and MF", {"flags": "DF+MF"})):
            self.add(f"IPv4 UDP {name}", e() / self.ip(4, **fields) / UDP() / p(40))
        self.add("IPv4 GRE", e() / self.ip(4) / GRE() / self.ip(4) / UDP() / p())
        for proto in (50, 132, 253, 0):
            self.add(f"IPv4 protocol {proto}", e() / self.ip(4, proto=proto) / p(40))
        self.add("IPv4 ICMP error in transit", e() / self.ip(4) / ICMP(type=3, code=1) /
                 self.ip(4, src=self.dst4(), dst=H1) / UDP() / p())
        for t in (17, 0):  # not 13: a timestamp reply differs by the time
            self.add(f"IPv4 ICMP type {t} to the router", e() / self.ip(4, dst=R2) / ICMP(type=t) / p())
        tcp = TCP(dport=80)
        tcp.dataofs = 3
        self.add("IPv4 TCP data offset 3", e() / self.ip(4) / tcp / p(24))
        tcp = TCP(dport=80)
        tcp.dataofs = 15
        self.add("IPv4 TCP data offset 15 past the packet", e() / self.ip(4) / tcp / p(8))
        self.add("IPv4 UDP length 4", e() / self.ip(4) / UDP(len=4) / p())
        self.add("IPv4 UDP length past the packet", e() / self.ip(4) / UDP(len=900) / p())
        self.add("IPv4 UDP checksum 0", e() / self.ip(4) / UDP(chksum=0) / p())
        self.add("IPv4 TCP SYN to the router (RST back)", e() / self.ip(4, dst=R2) / TCP(dport=81, flags="S") / p())

    def ipv6_cases(self) -> None:
        e, p = self.eth, self.payload
        for src, what in (("ff02::1", "multicast"), ("::1", "loopback"), ("::", "unspecified"),
                          ("fe80::1", "link-local"), ("::ffff:10.0.1.2", "IPv4-mapped"),
                          (R1_6, "the router's own (ingress)"), (R2_6, "the router's own (egress)"),
                          ("fd00:2::9", "h2's subnet"), ("2001:db8:77::1", "no route back")):
            self.add(f"IPv6 UDP source {src} ({what})", e() / self.ip(6, src=src) / UDP() / p())
        # (no link-local unicast destination: the fast path passes it, and the kernel's answer,
        # an ICMPv6 error after a failed neighbor resolution, lands seconds later in another window)
        for dst, what in (("::1", "loopback"), ("::", "unspecified"), ("ff0e::1", "global multicast, unicast MAC"),
                          ("ff02::1", "link-local multicast, unicast MAC"),
                          ("::ffff:1.2.3.4", "IPv4-mapped"), ("fd00:2::", "subnet-router anycast")):
            self.add(f"IPv6 UDP destination {dst} ({what})", e() / self.ip(6, dst=dst) / UDP() / p())
        chains = {
            "hop-by-hop PadN": [IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\0\0\0\0")])],
            "hop-by-hop router alert": [IPv6ExtHdrHopByHop(options=[RouterAlert()])],
            "hop-by-hop unknown option, skip": [IPv6ExtHdrHopByHop(options=[HBHOptUnknown(otype=0x1e, optdata=b"ab")])],
            "hop-by-hop unknown option, discard":
                [IPv6ExtHdrHopByHop(options=[HBHOptUnknown(otype=0x5e, optdata=b"ab")])],
            "hop-by-hop unknown option, ICMP": [IPv6ExtHdrHopByHop(options=[HBHOptUnknown(otype=0x9e, optdata=b"ab")])],
            "destination options": [IPv6ExtHdrDestOpt(options=[Pad1(), Pad1()])],
            "routing type 0, segments left 0": [IPv6ExtHdrRouting(type=0, segleft=0, addresses=["2001:db8::1"])],
            "routing type 0, segments left 1": [IPv6ExtHdrRouting(type=0, segleft=1, addresses=["2001:db8::1"])],
            "routing type 2": [IPv6ExtHdrRouting(type=2, segleft=1, addresses=["2001:db8::1"])],
            "segment routing header": [IPv6ExtHdrSegmentRouting(addresses=["2001:db8::1"], segleft=0)],
            "atomic fragment": [IPv6ExtHdrFragment(id=7)],
            "AH": [AH(spi=1, seq=1, icv=b"\0" * 12)],
            "dest opts, routing, dest opts": [IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(segleft=0), IPv6ExtHdrDestOpt()],
            "8 destination options": [IPv6ExtHdrDestOpt() for _ in range(8)],
            "9 destination options": [IPv6ExtHdrDestOpt() for _ in range(9)],
            "12 destination options": [IPv6ExtHdrDestOpt() for _ in range(12)],
            "hop-by-hop not first": [IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop()],
        }
        for name, hdrs in chains.items():
            for k in ("udp", "tcp"):
                pkt = self.ip(6)
                for h in hdrs:
                    pkt = pkt / h
                self.add(f"IPv6 {name} then {k}", e() / pkt / self.l4(6, k, 24))
        for nh, what in ((59, "no next header"), (50, "ESP"), (132, "SCTP"), (253, "experimental")):
            self.add(f"IPv6 next header {nh} ({what})", e() / self.ip(6, nh=nh) / p(40))
        self.add("IPv6 version 4 in the header", e() / self.ip(6, version=4) / UDP() / p())
        self.add("IPv6 payload length beyond the frame", e() / self.ip(6, plen=300) / UDP() / p())
        self.add("IPv6 payload length 0 with a payload", e() / self.ip(6, plen=0) / UDP() / p())
        self.add("IPv6 ICMPv6 error in transit", e() / self.ip(6) / ICMPv6DestUnreach() /
                 self.ip(6, src=self.dst6(), dst=H1_6) / UDP() / p())
        self.add("IPv6 neighbour solicitation in transit", e() / self.ip(6, hlim=255) / ICMPv6ND_NS(tgt=self.dst6()))
        self.add("IPv6 UDP length 4", e() / self.ip(6) / UDP(len=4) / p())
        tcp = TCP(dport=80)
        tcp.dataofs = 3
        self.add("IPv6 TCP data offset 3", e() / self.ip(6) / tcp / p(24))
        self.add("IPv6 TCP SYN to the router (RST back)", e() / self.ip(6, dst=R2_6) / TCP(dport=81, flags="S") / p())

    def l2_cases(self) -> None:
        p = self.payload
        for v in (4, 6):
            ip = lambda: self.ip(v) / UDP() / p()  # noqa: E731
            self.add(f"IPv{v} UDP VLAN 10", self.eth() / Dot1Q(vlan=10) / ip())
            self.add(f"IPv{v} UDP priority tag (VLAN 0)", self.eth() / Dot1Q(vlan=0, prio=5) / ip())
            self.add(f"IPv{v} UDP QinQ 20.30", self.eth() / Dot1AD(vlan=20) / Dot1Q(vlan=30) / ip())
            self.add(f"IPv{v} UDP to broadcast MAC", self.eth("ff:ff:ff:ff:ff:ff") / ip())
            self.add(f"IPv{v} UDP to another host's MAC", self.eth("02:00:00:00:00:99") / ip())
            mc = "01:00:5e:01:02:03" if v == 4 else "33:33:00:00:00:01"
            self.add(f"IPv{v} UDP to a multicast MAC", self.eth(mc) / ip())
            group = "239.1.2.3" if v == 4 else "ff0e::123"
            self.add(f"IPv{v} UDP multicast {group}", self.eth(mc) / self.ip(v, dst=group) / UDP() / p())
        self.add("ARP request for the router", self.eth("ff:ff:ff:ff:ff:ff") /
                 ARP(op=1, hwsrc=self.h1_mac, psrc=H1, pdst=R1))
        self.add("ARP request for h2", self.eth("ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=self.h1_mac, psrc=H1, pdst=H2))
        self.add("ethertype 0x88b5 (local experimental)", self.eth() / Raw(struct.pack("!H", 0x88B5)) / p(46),
                 raw=bytes(self.eth())[:12] + b"\x88\xb5" + bytes(p(46)))
        self.add("IPv4 ethertype, 10 bytes of header", None, raw=bytes(self.eth())[:12] + b"\x08\x00" + b"\x45" * 10)
        self.add("IPv6 ethertype, 30 bytes of header", None, raw=bytes(self.eth())[:12] + b"\x86\xdd" + b"\x60" * 30)


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """1 to 4 random bytes of the headers after Ethernet changed; half the time the IPv4
    header checksum recomputed, so the mutation gets past the checksum."""
    raw = bytearray(frame)
    end = frame.find(TAG)  # headers only: the tag says whose outputs are whose
    for _ in range(rng.randint(1, 4)):
        raw[rng.randrange(14, end)] = rng.getrandbits(8)
    if rng.random() < 0.5 and raw[12:14] == b"\x08\x00" and raw[14] >> 4 == 4 and raw[14] & 15 >= 5:
        hl = (raw[14] & 15) * 4
        if len(raw) >= 14 + hl:
            raw[24:26] = b"\0\0"
            raw[24:26] = struct.pack("!H", inet_checksum(bytes(raw[14:14 + hl])))
    return bytes(raw)


def _l3(frame: bytes) -> tuple[int, int]:
    """(ethertype after VLAN tags, offset of L3)."""
    off, et = 14, int.from_bytes(frame[12:14], "big")
    while et in (0x8100, 0x88A8) and len(frame) >= off + 4:
        et, off = int.from_bytes(frame[off + 2:off + 4], "big"), off + 4
    return et, off


def addresses(frame: bytes):
    """(version, src, dst, is_fragment) of an IP frame, or None."""
    et, off = _l3(frame)
    try:
        if et == 0x0800 and len(frame) >= off + 20:
            frag = int.from_bytes(frame[off + 6:off + 8], "big") & 0x3FFF
            return 4, ipaddress.ip_address(frame[off + 12:off + 16]), ipaddress.ip_address(frame[off + 16:off + 20]), \
                bool(frag)
        if et == 0x86DD and len(frame) >= off + 40:
            return 6, ipaddress.ip_address(frame[off + 8:off + 24]), ipaddress.ip_address(frame[off + 24:off + 40]), \
                IPv6ExtHdrFragment in Ether(frame)
    except ValueError:
        return None
    return None


def safe(frame: bytes) -> bool:
    """Does the frame's outcome complete at once? Not when it goes to a
    neighbour the router would have to resolve, or is a fragment for the
    router itself (reassembly times out 30 s later, with an ICMP error), or
    goes to h1's IPv6 subnet (ICMPv6 redirects are rate-limited per second)."""
    a = addresses(frame)
    if a is None:
        return True
    version, src, dst, frag = a
    if any(src in n for n in CONNECTED) and src not in NEIGHBORS | ROUTER_ADDRS:
        return False  # an ICMP error or a reply to it would wait for resolution
    if dst in ROUTER_ADDRS or (version == 4 and dst.packed[3] == 255 and
                               any(dst in n for n in CONNECTED)):
        return not frag
    if dst in NEIGHBORS:
        return False  # the host would answer: its answer is not the router's outcome
    if dst.is_multicast and frag:
        return False
    return not any(dst in n for n in CONNECTED)


# ---------------------------------------------------------------- traits

def traits(frame: bytes) -> frozenset[str]:
    """What is unusual about a frame, read from its bytes alone (never from an
    outcome): the names the known-divergence list uses."""
    out = set()
    et, off = _l3(frame)
    if off != 14:
        return frozenset({"vlan"})
    l4 = None
    if et == 0x0800 and len(frame) >= off + 20:
        ihl = (frame[off] & 15) * 4
        tot = int.from_bytes(frame[off + 2:off + 4], "big")
        if frame[off] >> 4 != 4 or ihl < 20 or len(frame) < off + ihl or tot < ihl or len(frame) < off + tot:
            return frozenset({"ipv4-malformed"})
        if inet_checksum(frame[off:off + ihl]) != 0:
            out.add("ipv4-bad-header-checksum")
        if len(frame) > off + tot:
            out.add("trailing-bytes")
        src, dst = ipaddress.ip_address(frame[off + 12:off + 16]), ipaddress.ip_address(frame[off + 16:off + 20])
        if src.packed[0] in (0, 127) or src.packed[0] >= 224:
            out.add("martian-source")
        elif src in ROUTER_ADDRS:
            out.add("local-source")
        elif src not in CONNECTED[0]:  # strict rp_filter: only h1's subnet lies behind r-eth0
            out.add("reverse-path")
        if dst.packed[0] in (0, 127) or (dst.packed[0] >= 240 and dst.packed != b"\xff" * 4):
            out.add("martian-destination")
        if not int.from_bytes(frame[off + 6:off + 8], "big") & 0x1FFF:
            l4 = (frame[off + 9], frame[off + ihl:off + tot])
    elif et == 0x86DD and len(frame) >= off + 40:
        plen = int.from_bytes(frame[off + 4:off + 6], "big")
        if frame[off] >> 4 != 6 or len(frame) < off + 40 + plen:
            return frozenset({"ipv6-malformed"})
        if len(frame) > off + 40 + plen:
            out.add("trailing-bytes")
        src, dst = ipaddress.ip_address(frame[off + 8:off + 24]), ipaddress.ip_address(frame[off + 24:off + 40])
        if src.is_multicast or src.is_loopback or src.is_unspecified or src.ipv4_mapped:
            out.add("martian-source")
        if src in ROUTER_ADDRS:
            out.add("local-source")
        if dst == ipaddress.ip_address("::") or dst.ipv4_mapped:
            out.add("martian-destination")
        nh, cur, end, n_ext = frame[off + 6], off + 40, off + 40 + plen, 0
        while nh in (0, 43, 60, 51, 44) and cur + 8 <= end:
            n_ext += 1
            if nh == 44:
                if int.from_bytes(frame[cur + 2:cur + 4], "big") & 0xFFF8:
                    nh = None
                    break
                nh, cur = frame[cur], cur + 8
            else:
                nh, cur = frame[cur], cur + ((frame[cur + 1] + 2) * 4 if nh == 51 else (frame[cur + 1] + 1) * 8)
        if n_ext > 8:
            out.add("ipv6-exthdr-chain-over-8")
        if nh is not None and cur <= end:
            l4 = (nh, frame[cur:end])
    if l4 is not None:
        proto, data = l4
        if proto == 6 and (len(data) < 20 or data[12] >> 4 < 5 or len(data) < (data[12] >> 4) * 4):
            out.add("l4-tcp-header")
        if proto == 17 and (len(data) < 8 or int.from_bytes(data[4:6], "big") < 8):
            out.add("l4-udp-header")
        if (proto == 1 and len(data) < 8) or (proto == 58 and len(data) < 4):
            out.add("l4-icmp-short")
    return frozenset(out)


# ---------------------------------------------------------------- the lab

def normalise(frame: bytes) -> bytes:
    """The router's own IPv4 ICMP (errors, replies; to either host) carry an
    IP id of its choosing (no DF: a hashed counter), different on every run:
    zeroed with the header checksum. Forwarded frames stay exact."""
    et, off = _l3(frame)
    if et == 0x0800 and len(frame) >= off + 20 and frame[off + 9] == 1 and \
            ipaddress.ip_address(frame[off + 12:off + 16]) in ROUTER_ADDRS:
        frame = frame[:off + 4] + b"\0\0" + frame[off + 6:off + 10] + b"\0\0" + frame[off + 12:]
        icmp = off + (frame[off] & 15) * 4
        if frame[icmp:icmp + 1] == b"\x0e":  # a timestamp reply carries the time: its checksum and times go
            frame = frame[:icmp + 2] + b"\0\0" + frame[icmp + 4:icmp + 8] + bytes(len(frame[icmp + 8:icmp + 20])) + \
                frame[icmp + 20:]
    return frame


def is_noise(frame: bytes) -> bool:
    """What a router's kernel sends on its own: MLD reports, IGMP, ARP/ND it
    originates (the corpus never makes it resolve a neighbour), and the
    unsolicited neighbour advertisements a change of IPv6 forwarding sends
    from its addresses."""
    et, off = _l3(frame)
    if et == 0x86DD and len(frame) >= off + 42 and frame[off + 8] == 0xFE and frame[off + 6] in (0, 58):
        return True  # link-local source: MLD (behind hop-by-hop), ND
    if et == 0x86DD and len(frame) >= off + 42 and frame[off + 6] == 58 and 133 <= frame[off + 40] <= 137 and \
            ipaddress.ip_address(frame[off + 8:off + 24]) in ROUTER_ADDRS:
        return True
    if et == 0x0800 and len(frame) >= off + 20 and frame[off + 9] == 2:
        return True
    return et == 0x0806 and frame[off + 6:off + 8] == b"\0\1"  # an ARP request: the router resolving


def _packet_socket(ns: str, ifname: str, proto: int) -> socket.socket:
    with netns.entered(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
        s.bind((ifname, proto))
    return s


def sentinel_kind(frame: bytes) -> str:
    """Which sentinel a frame at a host comes from (the quoted one for an error)."""
    et, off = _l3(frame)
    if et == 0x86DD:
        return "echo6"
    if frame[off + 9] == 1:
        icmp = off + (frame[off] & 15) * 4
        return "ttl" if frame[icmp] == 11 else "echo4"
    return "hairpin" if frame[off + 16:off + 20] == frame[off + 12:off + 16] else "forward"


def _sentinel_id(frame: bytes) -> int | None:
    i = frame.find(SENTINEL)
    return struct.unpack("!I", frame[i + 4:i + 8])[0] if i >= 0 and len(frame) >= i + 8 else None


class FrameLab:
    """The lab set up for the differential; `run(cases)` sends the corpus
    through whatever forwards in the router namespace right now."""

    def __init__(self, name: str, baseline_object: str):
        self.lab = Lab(name)
        self.lab.up()
        self.links: list = []
        try:
            self._setup(baseline_object)
        except BaseException:
            self.down()
            raise

    def _setup(self, baseline_object: str) -> None:
        lab = self.lab
        for ifname in ("r-eth1",):
            lab.run("r", ["ip", "link", "set", ifname, "mtu", str(EGRESS_MTU)], check=True)
        lab.run("h2", ["ip", "link", "set", "h2-eth0", "mtu", str(EGRESS_MTU)], check=True)
        for key, value in SYSCTLS.items():
            lab.run("r", ["sysctl", "-qw", f"{key}={value}"], check=True)
        _, self.h1_mac = lab.link("h1", "h1-eth0")
        _, self.h2_mac = lab.link("h2", "h2-eth0")
        _, self.r_mac = lab.link("r", "r-eth0")
        neighbors = [(a, "r-eth0", self.h1_mac) for a in (H1, H1_6, *SOURCES4)] + \
            [(H2, "r-eth1", self.h2_mac), (H2_6, "r-eth1", self.h2_mac)]
        lab.run("r", ["ip", "-batch", "-"], check=True, input="".join(
            f"neigh replace {a} lladdr {mac_str(mac)} dev {dev} nud permanent\n" for a, dev, mac in neighbors))
        for route in ROUTES:
            lab.run("r", ["ip", "route", "add", *route.split()], check=True)
        obj = BpfObject(baseline_object)
        obj.only_programs("xdp_pass")
        obj.load()
        self.obj = obj
        for host, ifname in (("h1", "h1-eth0"), ("h2", "h2-eth0")):
            lab.run(host, ["ethtool", "-K", ifname, "gro", "off"], check=True)
            idx, _ = lab.link(host, ifname)
            self.links.append(netns.run_in(lab.ns(host), Link.create_xdp, obj.program("xdp_pass"), idx,
                                           XDP_FLAGS_DRV_MODE))
        self.windows = 0

    @contextlib.contextmanager
    def sysctls(self, values: dict[str, tuple[str, str]]):
        """Set the router's sysctls to values' first, then back to their second."""
        for key, (value, _) in values.items():
            self.lab.run("r", ["sysctl", "-qw", f"{key}={value}"], check=True)
        try:
            yield
        finally:
            for key, (_, back) in values.items():
                self.lab.run("r", ["sysctl", "-qw", f"{key}={back}"], check=True)

    def down(self) -> None:
        for link in self.links:
            link.close()
        self.links = []
        self.lab.down()

    def sentinels(self, n: int) -> list[bytes]:
        """The sentinel frames of window n, one of each kind (SENTINELS_*); the
        window number is patched into frames built once."""
        if not hasattr(self, "_sentinels"):
            e = Ether(src=mac_str(self.h1_mac), dst=mac_str(self.r_mac))
            tail = Raw(SENTINEL + bytes(4))
            udp = UDP(sport=9, dport=9, chksum=0) / tail  # no checksum: nothing to recompute
            self._sentinels = [bytes(e / IP(src=H1, dst="10.99.255.254") / udp), bytes(e / IP(src=H1, dst=H1) / udp),
                               bytes(e / IP(src=H1, dst="10.99.255.254", ttl=1) / udp),
                               bytes(e / IP(src=H1, dst=R1) / ICMP(id=9) / tail),
                               bytes(e / IPv6(src=H2_6, dst=R1_6) / ICMPv6EchoRequest(id=9) / tail)]
        out = [f[:-4] + struct.pack("!I", n) for f in self._sentinels]
        echo4, echo6 = bytearray(out[3]), bytearray(out[4])
        echo4[36:38] = b"\0\0"
        echo4[36:38] = struct.pack("!H", inet_checksum(bytes(echo4[34:])))
        echo6[56:58] = b"\0\0"
        pseudo = bytes(echo6[22:54]) + struct.pack("!II", len(echo6) - 54, 58)
        echo6[56:58] = struct.pack("!H", inet_checksum(pseudo + bytes(echo6[54:])))
        return out[:3] + [bytes(echo4), bytes(echo6)]

    def run(self, cases: list[Case], forwarding: bool = True, timeout: float = 10.0) -> dict[int, Outcome]:
        """Each case's outcome: what reached h2 and h1 in its window. Pass
        forwarding=False when the router may not forward (the sentinels that
        need it are not waited for)."""
        want = SENTINELS_FORWARDED if forwarding else SENTINELS_LOCAL
        tx = _packet_socket(self.lab.ns("h1"), "h1-eth0", 0)
        rx = {"h1": _packet_socket(self.lab.ns("h1"), "h1-eth0", ETH_P_ALL),
              "h2": _packet_socket(self.lab.ns("h2"), "h2-eth0", ETH_P_ALL)}
        for s in rx.values():
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
            s.setblocking(False)
        affinity = os.sched_getaffinity(0)
        # one CPU: the kernel's receive path runs in order on the sending CPU's backlog
        os.sched_setaffinity(0, {min(affinity)})
        out: dict[int, Outcome] = {}
        try:
            for case in cases:
                self.windows += 1
                n = self.windows
                tx.send(case.frame)
                for s in self.sentinels(n):
                    tx.send(s)
                outcome = out.setdefault(case.id, Outcome())
                seen: set[tuple[str, str]] = set()
                deadline = time.monotonic() + timeout
                while not want <= seen:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise AssertionError(f"the sentinels of case {case.id} ({case.desc}) did not come back "
                                             f"(seen {seen}, want {want}): the lab is not forwarding")
                    ready, _, _ = select.select(list(rx.values()), [], [], left)
                    for host, s in rx.items():
                        if s not in ready:
                            continue
                        while True:
                            try:
                                frame, addr = s.recvfrom(65535)
                            except BlockingIOError:
                                break
                            if addr[2] == PACKET_OUTGOING or is_noise(frame):
                                continue
                            sid = _sentinel_id(frame)
                            if sid is not None:
                                if sid == n:
                                    seen.add((host, sentinel_kind(frame)))
                                continue
                            owner = tag_of(frame)
                            target = out.setdefault(owner, Outcome()) if owner is not None else outcome
                            (target.at_h2 if host == "h2" else target.at_h1).append(frame)
        finally:
            os.sched_setaffinity(0, affinity)
            tx.close()
            for s in rx.values():
                s.close()
        return out


def tag_of(frame: bytes) -> int | None:
    i = frame.find(TAG)
    if i < 0 or len(frame) < i + 8:
        return None
    return struct.unpack("!I", frame[i + 4:i + 8])[0]


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


# ---------------------------------------------------------------- comparison

@dataclass
class Divergence:
    case: Case
    kernel: Outcome
    xdp: Outcome
    phase: str = ""            # a SYSCTL_PHASES name, or "" for the first run

    @property
    def traits(self) -> frozenset[str]:
        return self.case.traits | ({self.phase} if self.phase else set())

    def __str__(self) -> str:
        return (f"#{self.case.id} {self.case.desc} [{', '.join(sorted(self.traits)) or 'no trait'}]\n"
                f"    frame   {self.case.frame.hex()}\n"
                f"    kernel: {describe(self.kernel)}\n"
                f"    xdp:    {describe(self.xdp)}")


def describe(o: Outcome) -> str:
    parts = []
    for where, frames in (("h2", o.at_h2), ("h1", o.at_h1)):
        for f in frames:
            parts.append(f"{where} <- {len(f)} B {Ether(f).summary()}")
    return "; ".join(parts) or "nothing (dropped)"


def compare(cases: list[Case], kernel: dict[int, Outcome], xdp: dict[int, Outcome],
            phase: str = "") -> list[Divergence]:
    out = []
    for c in cases:
        k, x = kernel.get(c.id, Outcome()), xdp.get(c.id, Outcome())
        if k.key() != x.key():
            out.append(Divergence(c, k, x, phase))
    return out


def phase_cases(cases: list[Case], n: int) -> list[Case]:
    """The frames of a sysctl phase: the first n routable ones (both families,
    all three protocols) and those with TTL or hop limit 0 to 2."""
    return [c for c in cases if c.routable][:n] + \
        [c for c in cases if re.fullmatch(r"IPv. \w+ (ttl|hop limit) [01]", c.desc)]


def run_differential(fl: "FrameLab", cases: list[Case], phases: list[str], phase_frames: int, up, down,
                     on_up=None) -> list[Divergence]:
    """The corpus through the kernel, then through bpfrouter (up()/down()
    start and stop it in the lab); then, for each phase, phase_cases with its
    sysctls. bpfrouter is restarted for each phase, so it starts with the
    sysctls set, as the kernel run had them. on_up() runs after the first
    bpfrouter run, with the router up."""
    sub = phase_cases(cases, phase_frames)
    kernel = {"": fl.run(cases)}
    for phase in phases:
        with fl.sysctls(SYSCTL_PHASES[phase]):
            kernel[phase] = fl.run(sub, forwarding=False)
    up()
    xdp = {"": fl.run(cases)}
    if on_up:
        on_up()
    for phase in phases:
        down()
        with fl.sysctls(SYSCTL_PHASES[phase]):
            up()
            xdp[phase] = fl.run(sub, forwarding=False)
    return compare(cases, kernel[""], xdp[""]) + \
        [d for phase in phases for d in compare(sub, kernel[phase], xdp[phase], phase)]


def build_corpus(seed: int, r_mac: bytes, h1_mac: bytes, valid: int, mutations: int) -> list[Case]:
    return CorpusBuilder(random.Random(seed), mac_str(r_mac), mac_str(h1_mac)).build(mutations, valid)

