"""Malformed and truncated packets. What the kernel's IP input drops (bad
header, checksum, lengths) is dropped and counted with a reason, never
forwarded, never passed on half-parsed. What follows the IP header is the
hosts' business: a short, cut or odd L4 header, a long or cut IPv6
extension chain, is forwarded as the kernel forwards it."""

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrRouting)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from .harness import XDP_DROP, XDP_PASS, XDP_REDIRECT, run_packet


def expected_for_cut(n, vlans, l3, kind, hlen, l3_total, full_result):
    """The reason for a frame cut to n bytes, from where the cut falls."""
    if n < 14 + 4 * vlans:
        return "DROP_TRUNC_L2"
    if n < l3 + hlen:
        return "DROP_TRUNC_L3"
    if n < l3 + l3_total:
        return "DROP_BAD_TOTAL_LEN"
    return full_result


TEMPLATES = {
    "ipv4+options/tcp": (lambda env: Ether(dst=env.if0_mac) /
                         IP(src="10.1.0.2", dst="10.20.1.2", options=b"\x01\x01\x01\x00") /
                         TCP(sport=1, dport=2, options=[("MSS", 1460)]) / Raw(b"abc"), 0, "PASS_IP_OPTIONS"),
    "ipv4/udp": (lambda env: Ether(dst=env.if0_mac) / IP(src="10.1.0.2", dst="10.20.1.2") /
                 UDP() / Raw(b"abcdef"), 0, "FWD_IPV4"),
    "vlan/vlan/ipv4/icmp": (lambda env: Ether(dst=env.if0_mac) / Dot1AD(vlan=2) / Dot1Q(vlan=3) /
                            IP(src="10.1.0.2", dst="10.20.1.2") / ICMP(), 2, "PASS_VLAN"),
    "ipv6/ext/tcp": (lambda env: Ether(dst=env.if0_mac) / IPv6(src="fd01::2", dst="fd20::5") /
                     IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting() / TCP(sport=1, dport=2) / Raw(b"xy"),
                     0, "FWD_IPV6"),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_cut_at_every_byte(env, name):
    build, vlans, full_result = TEMPLATES[name]
    frame = bytes(build(env))
    pkt = Ether(frame)  # re-parsed so length fields are filled in
    l3 = 14 + 4 * vlans
    if IP in pkt:
        hlen, total, kind = 20, pkt[IP].len, 4
        hlen_full = pkt[IP].ihl * 4
    else:
        hlen, total, kind = 40, 40 + pkt[IPv6].plen, 6
        hlen_full = 40
    for n in range(14, len(frame) + 1):
        cut = frame[:n]
        want = expected_for_cut(n, vlans, l3, kind, hlen_full if n >= l3 + hlen else hlen, total, full_result)
        res = run_packet(env, "bpf", cut)
        assert res.reason.name == want, f"{name} cut to {n}/{len(frame)} bytes"
        if want.startswith("DROP"):
            assert res.action == XDP_DROP
        elif want.startswith("PASS"):
            assert res.action == XDP_PASS and res.out == cut


def l4_truncated_v4(env, l4: bytes, proto: int, keep: int) -> bytes:
    ip = IP(src="10.1.0.2", dst="10.20.1.2", proto=proto) / Raw(l4[:keep])
    return bytes(Ether(dst=env.if0_mac) / ip)


@pytest.mark.parametrize("proto,l4", [
    (6, bytes(TCP(sport=1, dport=2, options=[("MSS", 1460)]))),
    (17, bytes(UDP(sport=1, dport=2))),
    (1, bytes(ICMP())),
])
def test_l4_truncated_with_consistent_lengths(env, proto, l4):
    for keep in range(0, len(l4) + 1):
        res = run_packet(env, "bpf", l4_truncated_v4(env, l4, proto, keep))
        assert (res.action, res.reason.name) == (XDP_REDIRECT, "FWD_IPV4"), f"proto {proto}, {keep} bytes"


def test_ipv6_exthdr_truncated_with_consistent_length(env):
    ext = bytes(IPv6ExtHdrDestOpt(nh=59, options=[]))  # 8 bytes, No Next Header after it
    for keep in range(1, 8):
        frame = bytes(Ether(dst=env.if0_mac) / IPv6(src="fd01::2", dst="fd20::5", nh=60) / Raw(ext[:keep]))
        res = run_packet(env, "bpf", frame)
        assert (res.action, res.reason.name) == (XDP_REDIRECT, "FWD_IPV6"), keep


def _v4(env, **kw):
    return Ether(dst=env.if0_mac) / IP(src="10.1.0.2", dst="10.20.1.2", **kw) / UDP() / Raw(b"data")


BAD = [
    ("ihl below 5", lambda env: _raw_set(bytes(_v4(env)), 14, 0x44), "DROP_BAD_IHL"),
    ("ip version 5 in an IPv4 frame", lambda env: _raw_set(bytes(_v4(env)), 14, 0x55), "DROP_BAD_IP_VERSION"),
    ("total length below header", lambda env: bytes(_v4(env, len=12)), "DROP_BAD_TOTAL_LEN"),
    ("total length beyond frame", lambda env: bytes(_v4(env, len=500)), "DROP_BAD_TOTAL_LEN"),
    ("ihl beyond total length", lambda env: bytes(Ether(dst=env.if0_mac) /
                                                   IP(src="10.1.0.2", dst="10.20.1.2", ihl=15, len=40) /
                                                   Raw(b"\0" * 60)), "DROP_BAD_TOTAL_LEN"),
    ("ipv6 version 4 in an IPv6 frame", lambda env: _raw_set(bytes(Ether(dst=env.if0_mac) /
                                                                   IPv6(src="fd01::2", dst="fd20::5") / UDP()),
                                                             14, 0x45), "DROP_BAD_IP_VERSION"),
    ("ipv6 payload length beyond frame", lambda env: bytes(Ether(dst=env.if0_mac) /
                                                           IPv6(src="fd01::2", dst="fd20::5", plen=400) / UDP()),
     "DROP_BAD_TOTAL_LEN"),
    ("bad ipv4 header checksum", lambda env: bytes(_v4(env, chksum=0x1234)), "DROP_BAD_CHECKSUM"),
    ("vlan tag cut short", lambda env: bytes(Ether(dst=env.if0_mac, type=0x8100)) + b"\x00", "DROP_TRUNC_L2"),
]


# The kernel forwards these: the router has no business with what follows the IP header.
FORWARDED = [
    ("tcp data offset below 5", lambda env: bytes(Ether(dst=env.if0_mac) / IP(src="10.1.0.2", dst="10.20.1.2") /
                                                  TCP(dataofs=4) / Raw(b"\0" * 20)), "FWD_IPV4"),
    ("tcp data offset beyond packet", lambda env: bytes(Ether(dst=env.if0_mac) / IP(src="10.1.0.2", dst="10.20.1.2") /
                                                        TCP(dataofs=15)), "FWD_IPV4"),
    ("udp length below 8", lambda env: bytes(Ether(dst=env.if0_mac) / IP(src="10.1.0.2", dst="10.20.1.2") /
                                             UDP(len=4)), "FWD_IPV4"),
    ("too many ipv6 extension headers", lambda env: bytes(
        Ether(dst=env.if0_mac) / IPv6(src="fd01::2", dst="fd20::5") /
        IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
        IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
        IPv6ExtHdrDestOpt() / UDP()), "FWD_IPV6"),
]


def _raw_set(frame: bytes, offset: int, value: int) -> bytes:
    return frame[:offset] + bytes([value]) + frame[offset + 1:]


@pytest.mark.parametrize("desc,build,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_fields(env, mode, desc, build, reason):
    res = run_packet(env, mode, build(env))
    assert (res.action, res.reason.name) == (XDP_DROP, reason)


@pytest.mark.parametrize("desc,build,reason", FORWARDED, ids=[b[0] for b in FORWARDED])
def test_odd_l4_forwarded(env, desc, build, reason):
    res = run_packet(env, "bpf", build(env))
    assert (res.action, res.reason.name) == (XDP_REDIRECT, reason)


def test_ipv6_fragments(env):
    first = Ether(dst=env.if0_mac) / IPv6(src="fd01::2", dst="fd20::5") / IPv6ExtHdrFragment(offset=0, m=1) / UDP() / Raw(b"a" * 16)
    later = Ether(dst=env.if0_mac) / IPv6(src="fd01::2", dst="fd20::5") / IPv6ExtHdrFragment(offset=3, nh=17) / Raw(b"b" * 16)
    assert run_packet(env, "bpf", bytes(first)).reason.name == "FWD_IPV6"
    assert run_packet(env, "bpf", bytes(later)).reason.name == "FWD_IPV6"
