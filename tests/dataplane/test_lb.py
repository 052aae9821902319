"""The load balancer's stage (bpf/stages/lb.h) through BPF_PROG_TEST_RUN:

- fixtures as a table (input frame, expected verdict and reason, check of
  the output frame) for each outer and inner family, a port-0 service, a
  fragment, a port that is no service's, a service without backends, a
  backend whose neighbor is unresolved; in both FIB modes;
- over thousands of flows: weights give their shares, the connection
  table keeps flows on their backend when backends come, go or drain, the
  flood switch stops learning above its limit, and a second router with
  the same definition sends every flow where the first does."""
from __future__ import annotations

import ipaddress
import os
import random
import struct
from collections import Counter

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpfrouter import netns
from bpfrouter.datapath import layout as lo
from bpfrouter.interfaces import Interfaces
from bpfrouter.lb.image import DEFAULT_SRC4, DEFAULT_SRC6, LbImage, vip_key
from bpfrouter.lb.service import Backend, Service, ServiceId
from bpfrouter.packet import inet_checksum

from .harness import MAC_GW, MAC_GW6, NS, XDP_DROP, XDP_PASS, XDP_REDIRECT, own_datapath, run_packet

VIP4, VIP6 = "10.20.99.1", "fd20::99:1"      # inside routed prefixes: a non-service port is simply routed
BE4 = ["10.20.5.1", "10.20.5.2", "10.20.5.3"]  # via 10.2.0.2 out of dpt1
BE6 = "fd20::5:1"
CLIENT = "10.1.0.2"


def service(proto, vip, port, backends, **kw) -> Service:
    return Service(ServiceId(proto, vip, port), {a: Backend(a, w) for a, w in backends}, **kw)


@pytest.fixture(scope="module")
def lb(env):
    """Services on the shared data planes (both FIB modes), removed after."""
    sids = []
    images = {m: LbImage(env.dps[m]) for m in ("bpf", "kernel")}
    with netns.entered(NS):
        for img in images.values():
            img.set_config(DEFAULT_SRC4, DEFAULT_SRC6, 0)
            for svc in (service("tcp", VIP4, 80, [(BE4[0], 1)]),
                        service("udp", VIP4, 0, [(BE4[1], 1)]),
                        service("tcp", VIP6, 443, [(BE6, 1)]),
                        service("tcp", VIP4, 8080, [(BE6, 1)]),          # IPv4 inside IPv6
                        service("tcp", VIP4, 81, [(BE4[2], 1)]),
                        service("tcp", VIP4, 82, [("10.2.0.77", 1)]),    # connected, no neighbor
                        service("tcp", VIP4, 83, [(BE4[0], 1)]),
                        service("tcp", VIP4, 84, [("10.40.5.1", 1)]),   # multipath route (ecmp stage)
                        service("tcp", VIP4, 85, [(BE4[0], 1)], encap="gue"),
                        service("tcp", VIP6, 444, [(BE6, 1)], encap="gue")):
                img.apply(svc, {})
                sids.append(svc.id)
            for svc, nat_src in ((service("tcp", VIP4, 90, [(BE4[0], 1)], mode="nat"), "10.2.0.1"),
                                 (service("udp", VIP4, 90, [(BE4[0], 1)], mode="nat"), "10.2.0.1"),
                                 (service("tcp", VIP6, 90, [(BE6, 1)], mode="nat"), "fd02::1"),
                                 (service("tcp", VIP4, 92, [("10.2.0.77", 1)], mode="nat"), "10.2.0.1")):
                img.apply(svc, {}, {a: nat_src for a in svc.backends})
                sids.append(svc.id)
            img.apply(service("tcp", VIP4, 81, [(BE4[2], 1)]), {BE4[2]: False})  # unhealthy: no backend
        for m in images:
            Interfaces(env.dps[m]).set_lb_flags(images[m].families())
    yield images
    with netns.entered(NS):
        for m, img in images.items():
            for sid in set(sids):
                img.remove(sid)
            Interfaces(env.dps[m]).set_lb_flags(0)


def tcp4(dport, dst=VIP4, sport=40000, frag=0):
    return bytes(Ether(src="02:00:00:00:01:01") / IP(src=CLIENT, dst=dst, ttl=50, flags=frag) /
                 TCP(sport=sport, dport=dport, flags="S") / Raw(b"hello"))


def frames(env, raw):
    """The frame addressed to the ingress port."""
    return Ether(dst=env.if0_mac, src="02:00:00:00:01:01") / Ether(raw).payload


def encapsulated(outer_family, backend, inner_family, gue=False):
    def check(env, sent, out):
        pkt = Ether(out)
        inner_sent = bytes(Ether(sent).payload)
        proto = 17 if gue else 4 if inner_family == 4 else 41
        udp = 8 if gue else 0
        if outer_family == 4:
            o = pkt[IP]
            assert o.dst == backend and ipaddress.ip_address(o.src) in DEFAULT_SRC4
            assert o.proto == proto and o.ttl == 64 and o.flags == 0
            assert o.len == 20 + udp + len(inner_sent)
            sum_sent = o.chksum
            del o.chksum
            assert IP(bytes(o)).chksum == sum_sent, "outer IPv4 checksum"
            assert pkt.dst == MAC_GW and pkt.src == env.if1_mac
        else:
            o = pkt[IPv6]
            assert o.dst == backend and ipaddress.ip_address(o.src) in DEFAULT_SRC6
            assert o.nh == proto and o.hlim == 64 and o.plen == udp + len(inner_sent)
            assert pkt.dst == MAC_GW6 and pkt.src == env.if1_mac
        payload = bytes(o.payload)
        if gue:    # variant 1: the packet right after UDP; the flow's hash in the source port, no checksum
            sport, dport, length, csum = struct.unpack("!HHHH", payload[:8])
            assert sport >= 0xC000 and (dport, length, csum) == (6080, 8 + len(inner_sent), 0)
        assert payload[udp:] == inner_sent, "the client's packet travels unchanged"
    return check


# (description, frame, (action, reason), check(env, sent, out) or None)
CASES = [
    ("tcp to VIP:80, IPIP to its backend", lambda: tcp4(80),
     (XDP_REDIRECT, "FWD_IPV4"), encapsulated(4, BE4[0], 4)),
    ("udp to a port-0 service, any port", lambda: bytes(Ether() / IP(src=CLIENT, dst=VIP4) / UDP(sport=5, dport=53)),
     (XDP_REDIRECT, "FWD_IPV4"), encapsulated(4, BE4[1], 4)),
    ("tcp to an IPv6 VIP, IPv6-in-IPv6", lambda: bytes(Ether() / IPv6(src="fd01::2", dst=VIP6) /
                                                      TCP(sport=1000, dport=443) / Raw(b"x" * 30)),
     (XDP_REDIRECT, "FWD_IPV6"), encapsulated(6, BE6, 6)),
    ("IPv4 VIP to an IPv6 backend, IPv4-in-IPv6", lambda: tcp4(8080),
     (XDP_REDIRECT, "FWD_IPV6"), encapsulated(6, BE6, 4)),
    ("tcp to a GUE service: IPv4 in GUE over IPv4", lambda: tcp4(85),
     (XDP_REDIRECT, "FWD_IPV4"), encapsulated(4, BE4[0], 4, gue=True)),
    ("tcp to an IPv6 GUE service: IPv6 in GUE over IPv6",
     lambda: bytes(Ether() / IPv6(src="fd01::2", dst=VIP6) / TCP(sport=1000, dport=444) / Raw(b"x" * 30)),
     (XDP_REDIRECT, "FWD_IPV6"), encapsulated(6, BE6, 6, gue=True)),
    ("tcp to the VIP on no service's port: routed as is", lambda: tcp4(9999),
     (XDP_REDIRECT, "FWD_IPV4"), lambda env, sent, out: Ether(out)[IP].proto == 6 or pytest.fail("encapsulated")),
    ("udp to a tcp service's port goes to the udp service of every port",
     lambda: bytes(Ether() / IP(src=CLIENT, dst=VIP4) / UDP(sport=5, dport=80)),
     (XDP_REDIRECT, "FWD_IPV4"), encapsulated(4, BE4[1], 4)),
    ("a fragment to a VIP is the kernel's", lambda: tcp4(80, frag="MF"),
     (XDP_PASS, "PASS_LB_FRAGMENT"), None),
    ("fragmentation needed about the VIP's reply goes to the flow's backend",
     lambda: bytes(Ether() / IP(src="10.20.1.1", dst=VIP4) / ICMP(type=3, code=4, nexthopmtu=1400) /
                   IP(src=VIP4, dst=CLIENT, ttl=60) / TCP(sport=80, dport=40000, flags="SA")),
     (XDP_REDIRECT, "FWD_IPV4"), encapsulated(4, BE4[0], 4)),
    ("packet too big about the VIP's reply goes to the flow's backend",
     lambda: bytes(Ether() / IPv6(src="fd20::1:1", dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) /
                   IPv6(src=VIP6, dst="fd01::2") / TCP(sport=443, dport=1000, flags="SA")),
     (XDP_REDIRECT, "FWD_IPV6"), encapsulated(6, BE6, 6)),
    ("a martian source to a VIP is dropped, as the kernel drops it before IPVS",
     lambda: bytes(Ether() / IP(src="127.0.0.9", dst=VIP4) / TCP(sport=1, dport=80)),
     (XDP_DROP, "DROP_MARTIAN_SOURCE"), None),
    ("an echo request to a VIP is routed", lambda: bytes(Ether() / IP(src=CLIENT, dst=VIP4) / ICMP()),
     (XDP_REDIRECT, "FWD_IPV4"), lambda env, sent, out: Ether(out)[IP].proto == 1 or pytest.fail("encapsulated")),
    ("service whose only backend is unhealthy", lambda: tcp4(81),
     (XDP_DROP, "DROP_LB_NO_BACKEND"), None),
    ("backend's neighbor unresolved: the encapsulated packet is the kernel's", lambda: tcp4(82),
     (XDP_PASS, "PASS_NO_NEIGH"), None),
]


@pytest.mark.parametrize("mode", ["bpf", "kernel"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fixture(env, lb, mode, case):
    desc, frame, (action, reason), check = case
    sent = bytes(frames(env, frame()))
    r = run_packet(env, mode, sent)
    assert (r.action, r.reason.name) == (action, reason), desc
    if check:
        check(env, sent, r.out)


def test_no_neigh_pass_carries_the_encapsulation(env, lb):
    """The kernel resolves the neighbor and sends what it was handed."""
    sent = bytes(frames(env, tcp4(82)))
    r = run_packet(env, "bpf", sent)
    o = Ether(r.out)[IP]
    assert o.dst == "10.2.0.77" and o.proto == 4 and bytes(o.payload) == bytes(Ether(sent).payload)


# --- over the MTU once encapsulated -------------------------------------------------------------

# dpt1, toward every backend, has MTU 1400. The client sits behind dpt1 too
# (10.20/16, fd20::/32), where its neighbor is known, so the answer leaves.
CLIENT4_FAR, CLIENT6_FAR = "10.20.7.8", "fd20::7:8"


def big4(dport, df=True, tos=0x2b, size=1390, client=CLIENT4_FAR):
    ip = IP(src=client, dst=VIP4, ttl=50, tos=tos, flags="DF" if df else 0, id=4321)
    return bytes(Ether() / ip / TCP(sport=40100, dport=dport, flags="A") / Raw(b"d" * (size - 40)))


def big6(dport=443, size=1380):
    ip = IPv6(src=CLIENT6_FAR, dst=VIP6, hlim=50, tc=0x2b, fl=0x12345)
    return bytes(Ether() / ip / TCP(sport=40100, dport=dport, flags="A") / Raw(b"d" * (size - 60)))


def answered(family, mtu, client=None, passed=False):
    """The client's answer, as the kernel's icmp_send / icmpv6_send build
    it (fields checked against the kernel's own forward path: tos 0xC0 with
    the quoted RT_TOS bits, no DF, TTL 64, 576 or 1280 bytes in all, the
    packet quoted as it arrived), from the VIP; sent to the client's
    next hop, or (passed) still addressed to the router."""
    def check(env, sent, out):
        pkt = Ether(out)
        client_pkt = bytes(Ether(sent).payload)
        if passed:
            assert (pkt.dst, pkt.src) == (Ether(sent).dst, Ether(sent).src), "a passed answer is the router's"
        else:
            assert (pkt.dst, pkt.src) == (MAC_GW if family == 4 else MAC_GW6, env.if1_mac)
        if family == 4:
            ip = pkt[IP]
            assert (ip.src, ip.dst, ip.proto, ip.len, ip.ttl, ip.flags, ip.tos) == \
                (VIP4, client or CLIENT4_FAR, 1, 576, 64, 0, 0xC0 | (0x2b & 0x1E))
            icmp = ip[ICMP]
            assert (icmp.type, icmp.code, icmp.nexthopmtu) == (3, 4, mtu)
            assert bytes(icmp)[8:] == client_pkt[:548], "the quote: the client's packet as it arrived"
            again = pkt.copy()
            del again[IP].chksum
            del again[ICMP].chksum
        else:
            ip = pkt[IPv6]
            assert (ip.src, ip.dst, ip.nh, ip.plen, ip.hlim, ip.tc) == (VIP6, client or CLIENT6_FAR, 58, 1240, 64, 0)
            icmp = ip[ICMPv6PacketTooBig]
            assert (icmp.code, icmp.mtu) == (0, mtu)
            assert bytes(icmp)[8:] == client_pkt[:1232], "the quote: the client's packet as it arrived"
            again = pkt.copy()
            del again[ICMPv6PacketTooBig].cksum
        assert bytes(Ether(bytes(again))) == bytes(pkt), "IP and ICMP checksums"
        assert len(out) == 14 + (576 if family == 4 else 1280)
    return check


TCP4_80, TCP4_84, TCP4_8080, TCP6_443 = (ServiceId("tcp", VIP4, 80), ServiceId("tcp", VIP4, 84),
                                         ServiceId("tcp", VIP4, 8080), ServiceId("tcp", VIP6, 443))
NAT4_90, NAT6_90 = ServiceId("tcp", VIP4, 90), ServiceId("tcp", VIP6, 90)
GUE4_85, GUE6_444 = ServiceId("tcp", VIP4, 85), ServiceId("tcp", VIP6, 444)
# (description, frame, its service, (action, reason), check, answered with ICMP)
TOO_BIG_CASES = [
    ("IPv4 with DF, IPIP: fragmentation needed, MTU less 20", lambda: big4(80), TCP4_80,
     (XDP_REDIRECT, "FWD_IPV4"), answered(4, 1380), True),
    ("IPv4 with DF, in IPv6: fragmentation needed, MTU less 40", lambda: big4(8080), TCP4_8080,
     (XDP_REDIRECT, "FWD_IPV4"), answered(4, 1360), True),
    ("IPv6, in IPv6: packet too big, MTU less 40", big6, TCP6_443,
     (XDP_REDIRECT, "FWD_IPV6"), answered(6, 1360), True),
    ("IPv4 with DF to a backend over a multipath route (the ecmp stage's MTU check)", lambda: big4(84), TCP4_84,
     (XDP_REDIRECT, "FWD_IPV4"), answered(4, 1380), True),
    ("IPv4 without DF: the kernel fragments the outer packet", lambda: big4(80, df=False), TCP4_80,
     (XDP_PASS, "PASS_FRAG_NEEDED"), None, False),
    ("GUE, IPv4 with DF: fragmentation needed, MTU less 28", lambda: big4(85), GUE4_85,
     (XDP_REDIRECT, "FWD_IPV4"), answered(4, 1372), True),
    ("GUE, IPv6: packet too big, MTU less 48", lambda: big6(444), GUE6_444,
     (XDP_REDIRECT, "FWD_IPV6"), answered(6, 1352), True),
    ("GUE's 8 bytes count: 1375 bytes fit in IPIP (1395), not in GUE (1403)", lambda: big4(85, size=1375), GUE4_85,
     (XDP_REDIRECT, "FWD_IPV4"), answered(4, 1372), True),
    ("IPv4 with DF, 10 bytes under: encapsulated and sent", lambda: big4(80, size=1380), TCP4_80,
     (XDP_REDIRECT, "FWD_IPV4"), encapsulated(4, BE4[0], 4), False),
    ("the answer to a client whose neighbor is unresolved: passed, addressed to the router",
     lambda: big4(80, client="10.2.0.78"), TCP4_80, (XDP_PASS, "PASS_NO_NEIGH"),
     answered(4, 1380, "10.2.0.78", passed=True), True),
    ("more than the ingress MTU (a GRO aggregate under generic XDP): not answered, the kernel's",
     lambda: big4(80, size=1600), TCP4_80, (XDP_PASS, "PASS_FRAG_NEEDED"), None, False),
    ("NAT, IPv4 with DF: fragmentation needed about the untranslated packet", lambda: big4(90, size=1410), NAT4_90,
     (XDP_REDIRECT, "FWD_IPV4"), answered(4, 1400), True),
    ("NAT, IPv6: packet too big about the untranslated packet", lambda: big6(90, size=1410), NAT6_90,
     (XDP_REDIRECT, "FWD_IPV6"), answered(6, 1400), True),
    ("NAT, IPv4 without DF: dropped, counted (the router's kernel would not send it)",
     lambda: big4(90, df=False, size=1410), NAT4_90, (XDP_DROP, "DROP_LB_NAT_UNROUTED"), None, False),
]


@pytest.mark.parametrize("mode", ["bpf", "kernel"])
@pytest.mark.parametrize("case", TOO_BIG_CASES, ids=[c[0] for c in TOO_BIG_CASES])
def test_over_the_mtu_once_encapsulated(env, lb, mode, case):
    """A DSR packet over the MTU toward its backend once encapsulated gets
    the answer IPVS gives (the kernel's ICMP, from the VIP), counted."""
    desc, frame, sid, (action, reason), check, answers = case
    before = lb[mode].service_stats(sid)["too_big"]
    sent = bytes(frames(env, frame()))
    r = run_packet(env, mode, sent)
    assert (r.action, r.reason.name) == (action, reason), desc
    if check:
        check(env, sent, r.out)
    assert lb[mode].service_stats(sid)["too_big"] - before == int(answers)


# --- NAT ----------------------------------------------------------------------------------------

def checksums_valid(pkt) -> None:
    """Every checksum scapy computes equals the one in the packet."""
    raw = bytes(pkt)
    again = pkt.copy()
    for layer in (IP, TCP, UDP):
        if layer in again:
            del again[layer].chksum
    assert bytes(Ether(bytes(again))) == raw, "a checksum is wrong"


def icmp_translated(out: bytes, addrs: tuple, quoted, icmp_layer) -> None:
    """An ICMP error the NAT translated: its outer addresses, the packet it
    quotes (`quoted` one hop older: the router forwarded it), and every
    checksum (outer, quoted, ICMP) as scapy computes it."""
    got = Ether(out)
    ipx = IP if IP in got else IPv6
    assert (got[ipx].src, got[ipx].dst) == addrs
    older = quoted.copy()
    if ipx is IP:
        older.ttl -= 1
        del older.chksum
    else:
        older.hlim -= 1
    assert bytes(got[icmp_layer].payload) == bytes(older.__class__(bytes(older))), "the quoted packet"
    again = got.copy()
    if ipx is IP:
        del again[ICMP].chksum
        del again[IP].chksum
    else:
        del again[icmp_layer].cksum
    assert bytes(Ether(bytes(again))) == bytes(got), "outer and ICMP checksums"


NAT_CASES = [("tcp", 4, "10.20.7.7", VIP4, BE4[0], "10.2.0.1"), ("udp", 4, "10.20.7.7", VIP4, BE4[0], "10.2.0.1"),
             ("tcp", 6, "fd20::7:7", VIP6, BE6, "fd02::1")]


@pytest.mark.parametrize("mode", ["bpf", "kernel"])
@pytest.mark.parametrize("case", NAT_CASES, ids=[f"{c[0]}{c[1]}" for c in NAT_CASES])
def test_nat_both_ways(env, lb, mode, case):
    """A client's packet leaves with the router's source and a port of its
    own to the backend; the backend's reply to that port leaves with the
    VIP's address and port to the client; ICMP errors about either go to
    the other side, about what that side sent; checksums stay valid."""
    proto, v, client, vip, backend, nat_src = case
    L4 = TCP if proto == "tcp" else UDP
    IPX = IP if v == 4 else IPv6
    hdr = (IPX(src=client, dst=vip, ttl=50) if v == 4 else IPX(src=client, dst=vip, hlim=50))
    sent = Ether(dst=env.if0_mac, src="02:00:00:00:01:01") / hdr / L4(sport=40001, dport=90) / Raw(b"request")
    r = run_packet(env, mode, bytes(sent))
    assert (r.action, r.reason.name) == (XDP_REDIRECT, f"FWD_IPV{v}")
    out = Ether(r.out)
    assert (out[IPX].src, out[IPX].dst, out[L4].dport) == (nat_src, backend, 90)
    port = out[L4].sport
    assert port >= 1024 and bytes(out[L4].payload) == b"request"
    checksums_valid(out)
    # the same flow again: the same translation
    assert Ether(run_packet(env, mode, bytes(sent)).out)[L4].sport == port
    reply = Ether(dst=env.if1_mac, src=MAC_GW if v == 4 else MAC_GW6) / \
        IPX(src=backend, dst=nat_src) / L4(sport=90, dport=port) / Raw(b"response")
    r = run_packet(env, mode, bytes(reply), iif="dpt1")
    assert (r.action, r.reason.name) == (XDP_REDIRECT, f"FWD_IPV{v}")
    back = Ether(r.out)
    assert (back[IPX].src, back[IPX].dst, back[L4].sport, back[L4].dport) == (vip, client, 90, 40001)
    assert bytes(back[L4].payload) == b"response"
    checksums_valid(back)
    # an ICMP error about the translated packet, from the backend to the
    # router: to the client, about the packet the client sent
    ICMPX = ICMP(type=3, code=3) if v == 4 else ICMPv6DestUnreach(code=4)
    err = Ether(dst=env.if1_mac, src=MAC_GW if v == 4 else MAC_GW6) / IPX(src=backend, dst=nat_src) / ICMPX / \
        bytes(out[IPX])
    r = run_packet(env, mode, bytes(err), iif="dpt1")
    assert (r.action, r.reason.name) == (XDP_REDIRECT, f"FWD_IPV{v}")
    # what the client sent, as the backend got it
    icmp_translated(r.out, (vip, client), Ether(bytes(sent))[IPX], ICMP if v == 4 else ICMPv6DestUnreach)
    # an ICMP error from the client's side about the VIP's reply (a hop's
    # fragmentation needed): to the backend, about the reply it sent
    hop = "10.20.1.1" if v == 4 else "fd20::1:1"
    ICMPC = ICMP(type=3, code=4, nexthopmtu=1300) if v == 4 else ICMPv6PacketTooBig(mtu=1280)
    err = Ether(dst=env.if0_mac, src="02:00:00:00:01:01") / IPX(src=hop, dst=vip) / ICMPC / bytes(back[IPX])
    r = run_packet(env, mode, bytes(err))
    assert (r.action, r.reason.name) == (XDP_REDIRECT, f"FWD_IPV{v}")
    icmp_translated(r.out, (nat_src, backend), reply[IPX], ICMP if v == 4 else ICMPv6PacketTooBig)
    # to the router's address on a port no flow was given: not translated, routed as it is
    stray = Ether(dst=env.if1_mac, src=MAC_GW) / IPX(src=backend, dst=nat_src) / L4(sport=90, dport=port ^ 1)
    r = run_packet(env, mode, bytes(stray), iif="dpt1")
    assert (Ether(r.out)[IPX].src, Ether(r.out)[IPX].dst) == (backend, nat_src)


def test_nat_to_an_unresolved_backend_is_dropped_counted(env, lb):
    """The router's kernel would drop a packet with its own source: the
    fast path drops and counts it instead (the health checks resolve the
    backend's neighbor)."""
    r = run_packet(env, "bpf", bytes(frames(env, tcp4(92))))
    assert (r.action, r.reason.name) == (XDP_DROP, "DROP_LB_NAT_UNROUTED")


# --- many flows ---------------------------------------------------------------------------------

FLOWS = 20_000


def flow_frames(env, n, seed, vip=VIP4, dport=80):
    """n TCP frames of distinct flows (random client addresses and ports) to vip:dport,
    built by patching one template."""
    rng = random.Random(seed)
    template = bytearray(bytes(frames(env, tcp4(dport, dst=vip))))
    out = []
    for _ in range(n):
        f = bytearray(template)
        struct.pack_into("!I", f, 26, 0x0B000000 | rng.getrandbits(24))
        struct.pack_into("!H", f, 34, rng.randrange(1024, 65536))
        f[24:26] = b"\0\0"
        struct.pack_into("!H", f, 24, inet_checksum(bytes(f[14:34])))
        out.append(bytes(f))
    return out


def backends_taken(env, dp, fr) -> list[str]:
    """The backend (outer destination) each frame was sent to."""
    out = []
    with netns.entered(NS):
        run = dp.program.test_run
        for f in fr:
            res = run(f, ingress_ifindex=env.ifindex["dpt0"])
            assert res.retval == XDP_REDIRECT, res.retval
            out.append(str(ipaddress.ip_address(res.data[30:34])))
    return out


@pytest.fixture
def lb_dp(env):
    with own_datapath(env, "lb") as dp:
        img = LbImage(dp)
        with netns.entered(NS):
            img.set_config(DEFAULT_SRC4, DEFAULT_SRC6, 0)
        yield dp, img


def apply(env, dp, img, svc, healthy=None):
    with netns.entered(NS):
        img.apply(svc, healthy or {})
        Interfaces(dp).set_lb_flags(img.families())


def test_weights_affinity_drain(env, lb_dp):
    dp, img = lb_dp
    svc = service("tcp", VIP4, 80, [(BE4[0], 1), (BE4[1], 2), (BE4[2], 1)])
    apply(env, dp, img, svc)
    fr = flow_frames(env, FLOWS, seed=1)
    first = backends_taken(env, dp, fr)
    for a, w in ((BE4[0], 1), (BE4[1], 2), (BE4[2], 1)):
        share = first.count(a) / FLOWS
        assert abs(share - w / 4) <= 0.015, f"{a} (weight {w}) took {share:.3%}, not {w / 4:.1%}"
    stats = img.service_stats(svc.id)
    assert stats["packets"] == FLOWS and stats["new_flows"] == FLOWS
    assert sum(b["packets"] for b in img.backend_stats(svc.id).values()) == FLOWS

    # a new backend: established flows stay where they are (the connection table) ...
    svc.backends["10.20.5.4"] = Backend("10.20.5.4", 4)
    apply(env, dp, img, svc)
    assert backends_taken(env, dp, fr) == first
    # ... while new flows reach it at its weight
    fresh = backends_taken(env, dp, flow_frames(env, FLOWS, seed=2))
    assert abs(fresh.count("10.20.5.4") / FLOWS - 0.5) <= 0.015
    # drained: its connections stay, no new flow goes there
    svc.backends[BE4[1]].weight = 0
    apply(env, dp, img, svc)
    assert backends_taken(env, dp, fr) == first
    assert BE4[1] not in backends_taken(env, dp, flow_frames(env, 2000, seed=3))
    # unhealthy: its flows move, every other flow stays
    apply(env, dp, img, svc, {BE4[0]: False})
    now = backends_taken(env, dp, fr)
    for a, b in zip(first, now):
        assert (b != BE4[0]) and (a == BE4[0] or a == b)
    # removed, and its slot given to a new backend before its flows come
    # back: they do not follow the slot to its next owner (the generation)
    slot = img.placed[svc.id].slots[BE4[2]]
    del svc.backends[BE4[2]]
    apply(env, dp, img, svc, {BE4[0]: False})
    svc.backends["10.20.5.9"] = Backend("10.20.5.9", 1)
    apply(env, dp, img, svc, {BE4[0]: False})
    assert img.placed[svc.id].slots["10.20.5.9"] == slot
    now = backends_taken(env, dp, fr)
    orphans = [b for a, b in zip(first, now) if a == BE4[2]]
    assert BE4[2] not in now and orphans.count("10.20.5.9") < 0.5 * len(orphans), Counter(orphans)


def test_no_affinity_and_same_table_on_every_router(env, lb_dp):
    """Two routers with one definition send each flow to the same backend,
    without state: the hash alone (no-affinity) on both."""
    dp, img = lb_dp
    svc = service("tcp", VIP4, 80, [(a, 1) for a in BE4], affinity=False)
    apply(env, dp, img, svc)
    fr = flow_frames(env, 5000, seed=5)
    a = backends_taken(env, dp, fr)
    with own_datapath(env, "lb2") as dp2:
        img2 = LbImage(dp2)
        with netns.entered(NS):
            img2.set_config(DEFAULT_SRC4, DEFAULT_SRC6, 0)
        # backends listed in another order: the table depends on the definition, not on the order
        apply(env, dp2, img2, service("tcp", VIP4, 80, [(x, 1) for x in reversed(BE4)], affinity=False))
        assert backends_taken(env, dp2, fr) == a
    with netns.entered(NS):
        assert not list(dp.maps["lb_conns"].keys()), "no-affinity learns nothing"


def test_flood_switch(env, lb_dp):
    """Above new-conn-limit (10) new flows per second per CPU the table
    stops learning; those flows still reach a backend, by the hash."""
    dp, img = lb_dp
    with netns.entered(NS):
        img.set_config(DEFAULT_SRC4, DEFAULT_SRC6, 10)
    svc = service("tcp", VIP4, 80, [(a, 1) for a in BE4])
    apply(env, dp, img, svc)
    n = 1000
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})    # one CPU's window
    try:
        backends_taken(env, dp, flow_frames(env, n, seed=7))
    finally:
        os.sched_setaffinity(0, cpus)
    with netns.entered(NS):
        learned = len(list(dp.maps["lb_conns"].keys()))
    st = img.service_stats(svc.id)
    # learning all n would take n / 10 one-second windows
    assert learned >= 10 and st["unlearned"] == n - learned > 0, (learned, st)
    assert st["flood_windows"] >= 1 and st["new_flows"] == n


def test_restart_reads_the_maps_back(env, lb_dp):
    """A second writer on the same maps (the agent after a restart) finds
    every id, slot and range, and writing the same definition changes nothing."""
    dp, img = lb_dp
    svc = service("tcp", VIP4, 80, [(a, 1) for a in BE4])
    apply(env, dp, img, svc)
    fr = flow_frames(env, 3000, seed=9)
    before = backends_taken(env, dp, fr)
    with netns.entered(NS):
        again = LbImage(dp)
    assert again.placed[svc.id].slots == img.placed[svc.id].slots
    assert again.placed[svc.id].table == img.placed[svc.id].table
    base = again.placed[svc.id].ring_base
    apply(env, dp, again, svc)
    assert again.placed[svc.id].ring_base == base, "same table: not rewritten"
    assert backends_taken(env, dp, fr) == before


def lb_addresses(dp) -> dict[str, int]:
    """lb_vips: address -> what it is (LB_ADDR_*)."""
    with netns.entered(NS):
        return {str(ipaddress.ip_address(bytes(k.addr[:4 if k.family == 4 else 16]))): v.value
                for k, v in dp.maps["lb_vips"].lookup_batch()}


def test_the_load_balancers_addresses(env, lb_dp):
    """lb_vips holds every VIP and every NAT source (where replies come
    back), shared ones while any service uses them; a restarted writer
    finds the NAT sources again; and entry sends the lb stage nothing
    else: a service whose VIP is missing there is not balanced."""
    dp, img = lb_dp
    nat_a = service("tcp", VIP4, 90, [(BE4[0], 1)], mode="nat")
    nat_b = service("tcp", VIP6, 90, [(BE6, 1)], mode="nat")
    nat_c = service("udp", VIP4, 90, [(BE4[1], 1)], mode="nat")
    dsr = service("tcp", VIP4, 80, [(BE4[2], 1)])
    with netns.entered(NS):
        img.apply(nat_a, {}, {BE4[0]: "10.2.0.1"})
        img.apply(nat_b, {}, {BE6: "fd02::1"})
        img.apply(nat_c, {}, {BE4[1]: "10.2.0.1"})
        img.apply(dsr, {})
        Interfaces(dp).set_lb_flags(img.families())
    want = {VIP4: lo.LB_ADDR_VIP, VIP6: lo.LB_ADDR_VIP, "10.2.0.1": lo.LB_ADDR_NAT_SOURCE,
            "fd02::1": lo.LB_ADDR_NAT_SOURCE}
    assert lb_addresses(dp) == want
    with netns.entered(NS):
        img.remove(nat_a.id)
    assert lb_addresses(dp) == want, "10.2.0.1 is still nat_c's"
    with netns.entered(NS):
        again = LbImage(dp)     # the agent after a restart
        assert again.placed[nat_c.id].nat_sources == {"10.2.0.1"}
        again.remove(nat_b.id)
    assert lb_addresses(dp) == {VIP4: lo.LB_ADDR_VIP, "10.2.0.1": lo.LB_ADDR_NAT_SOURCE}
    # without its address in lb_vips, the DSR service's packet is routed as it is
    frame = bytes(frames(env, tcp4(80)))
    assert backends_taken(env, dp, [frame]) == [BE4[2]]
    with netns.entered(NS):
        dp.maps["lb_vips"].delete(vip_key(ipaddress.ip_address(VIP4)))
        res = dp.program.test_run(frame, ingress_ifindex=env.ifindex["dpt0"])
    assert res.retval == XDP_REDIRECT and Ether(res.data)[IP].dst == VIP4 and Ether(res.data)[IP].proto == 6


# --- the backend's decapsulation (decap.bpf.c) ------------------------------------------------

def inner4():
    return IP(src=CLIENT, dst=VIP4, ttl=50) / TCP(sport=40000, dport=80) / Raw(b"hello")


def inner6():
    return IPv6(src="fd01::2", dst=VIP6) / TCP(sport=40000, dport=443) / Raw(b"hello")


ETH = Ether(dst="02:00:00:00:00:aa", src="02:00:00:00:00:bb")
# (description, frame, XDP action, the frame that must come out (None: unchanged), counter)
DECAP_CASES = [
    ("IPv4 in IPv4", ETH / IP(src="172.16.1.2", dst="10.20.5.1", proto=4) / inner4(), XDP_PASS,
     ETH / inner4(), "v4_in_v4"),
    ("IPv6 in IPv4", ETH / IP(src="172.16.1.2", dst="10.20.5.1", proto=41) / inner6(), XDP_PASS,
     ETH / inner6(), "v6_in_v4"),
    ("IPv4 in IPv6", ETH / IPv6(src="100::1", dst=BE6, nh=4) / inner4(), XDP_PASS, ETH / inner4(), "v4_in_v6"),
    ("IPv6 in IPv6", ETH / IPv6(src="100::1", dst=BE6, nh=41) / inner6(), XDP_PASS, ETH / inner6(), "v6_in_v6"),
    ("plain TCP passes untouched", ETH / inner4(), XDP_PASS, None, None),
    ("an outer fragment is the kernel's", ETH / IP(src="172.16.1.2", dst="10.20.5.1", proto=4, flags="MF") / inner4(),
     XDP_PASS, None, None),
    ("GRE is not ours", ETH / IP(src="172.16.1.2", dst="10.20.5.1", proto=47) / Raw(b"\0" * 24), XDP_PASS, None, None),
    ("IPIP from outside the encap prefix passes as it came", ETH / IP(src="10.9.9.9", dst="10.20.5.1", proto=4) /
     inner4(), XDP_PASS, None, "foreign"),
    ("IPv6 outer source outside the /96", ETH / IPv6(src="100::1:0:1", dst=BE6, nh=41) / inner6(), XDP_PASS, None,
     "foreign"),
    ("IPv4 in GUE over IPv4", ETH / IP(src="172.16.1.2", dst="10.20.5.1") / UDP(sport=50000, dport=6080, chksum=0) /
     inner4(), XDP_PASS, ETH / inner4(), "v4_in_v4 gue"),
    ("IPv6 in GUE over IPv6 (UDP checksum 0)", ETH / IPv6(src="100::1", dst=BE6) /
     UDP(sport=50000, dport=6080, chksum=0) / inner6(), XDP_PASS, ETH / inner6(), "v6_in_v6 gue"),
    ("IPv4 in GUE over IPv6", ETH / IPv6(src="100::1", dst=BE6) / UDP(sport=50000, dport=6080, chksum=0) / inner4(),
     XDP_PASS, ETH / inner4(), "v4_in_v6 gue"),
    ("UDP to another port passes untouched", ETH / IP(src="172.16.1.2", dst="10.20.5.1") /
     UDP(sport=50000, dport=6081) / inner4(), XDP_PASS, None, None),
    ("UDP to the GUE port that is not IP (GUE variant 0) passes untouched", ETH / IP(src="172.16.1.2", dst="10.20.5.1") /
     UDP(sport=50000, dport=6080) / Raw(b"\x00\x00\x00\x00" + b"x" * 20), XDP_PASS, None, None),
    ("GUE from outside the encap prefix", ETH / IP(src="10.9.9.9", dst="10.20.5.1") /
     UDP(sport=50000, dport=6080, chksum=0) / inner4(), XDP_PASS, None, "foreign"),
    ("GUE over IPv6 from outside the /96", ETH / IPv6(src="100::1:0:1", dst=BE6) /
     UDP(sport=50000, dport=6080, chksum=0) / inner6(), XDP_PASS, None, "foreign"),
]


@pytest.fixture(scope="module")
def decap_prog():
    from bpfrouter.bpf import BpfObject
    from tests.conftest import OBJECT
    from bpfrouter.lb.decap import DEFAULT_FROM, configure
    with BpfObject(str(OBJECT.with_name("decap.bpf.o"))) as obj:
        configure(obj, list(DEFAULT_FROM))
        obj.load()
        yield obj.program("bpfrouter_decap"), obj.map("decap_stats", lo.u32, lo.u64)


@pytest.mark.parametrize("case", DECAP_CASES, ids=[c[0] for c in DECAP_CASES])
def test_decap_fixture(decap_prog, case):
    from bpfrouter.lb.decap import DECAP_STATS
    prog, stats = decap_prog
    desc, frame, action, want, counter = case

    def counts():
        return [sum(v.value for v in stats.lookup(lo.u32(i))) for i in range(len(DECAP_STATS))]
    before = counts()
    res = prog.test_run(bytes(frame))
    assert res.retval == action, desc
    assert res.data == bytes(want if want is not None else frame), desc
    moved = [DECAP_STATS[i] for i, (a, b) in enumerate(zip(before, counts())) if a != b]
    assert moved == (counter.split() if counter else []), desc


def test_decap_without_gue():
    """--gue-port 0: GUE to the default port passes untouched."""
    from bpfrouter.bpf import BpfObject
    from tests.conftest import OBJECT
    from bpfrouter.lb.decap import DEFAULT_FROM, configure
    frame = bytes(ETH / IP(src="172.16.1.2", dst="10.20.5.1") / UDP(sport=50000, dport=6080, chksum=0) / inner4())
    with BpfObject(str(OBJECT.with_name("decap.bpf.o"))) as obj:
        configure(obj, list(DEFAULT_FROM), gue_port=0)
        obj.load()
        res = obj.program("bpfrouter_decap").test_run(frame)
        stats = obj.map("decap_stats", lo.u32, lo.u64)
        assert (res.retval, res.data) == (XDP_PASS, frame)
        assert all(sum(v.value for v in stats.lookup(lo.u32(i))) == 0 for i in range(7))
