"""Routing decisions and rewrites, in both FIB modes, through BPF_PROG_TEST_RUN."""
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6, IPv6ExtHdrHopByHop, ICMPv6EchoRequest
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from bpfrouter.datapath.layout import Reason

from .harness import (MAC_GW, MAC_GW6, MAC_H9, XDP_DROP, XDP_PASS, XDP_REDIRECT, Case, run_packet)

SRC = "10.1.0.2"
SRC6 = "fd01::2"


def v4(dst, ttl=64, l4=None, size=0, **ip):
    return lambda env: bytes(Ether(dst=env.if0_mac, src="02:00:00:00:01:01") /
                             IP(src=SRC, dst=dst, ttl=ttl, **ip) /
                             (l4 if l4 is not None else UDP(sport=1234, dport=5678)) / Raw(b"x" * size))


def v6(dst, hlim=64, l4=None, src=SRC6, ext=None):
    def build(env):
        p = IPv6(src=src, dst=dst, hlim=hlim)
        if ext is not None:
            p = p / ext
        return bytes(Ether(dst=env.if0_mac, src="02:00:00:00:01:01") / p /
                     (l4 if l4 is not None else UDP(sport=1234, dport=5678)) / Raw(b"payload"))
    return build


def forwarded_v4(dmac):
    def check(env, out):
        pkt = Ether(out)
        assert pkt.dst == dmac and pkt.src == env.if1_mac
        assert pkt[IP].ttl == 63
        sent = pkt[IP].chksum
        del pkt[IP].chksum
        assert IP(bytes(pkt[IP])).chksum == sent, "IPv4 header checksum not updated correctly"
        udp_sum = pkt[UDP].chksum
        del pkt[UDP].chksum
        assert Ether(bytes(pkt))[UDP].chksum == udp_sum, "UDP checksum must stay valid"
    return check


def forwarded_v6(env, out):
    pkt = Ether(out)
    assert pkt.dst == MAC_GW6 and pkt.src == env.if1_mac
    assert pkt[IPv6].hlim == 63
    assert bytes(pkt[Raw]) == b"payload"


CASES = [
    Case("ipv4 via gateway", v4("10.20.1.2"), (XDP_REDIRECT, "FWD_IPV4"), check=forwarded_v4(MAC_GW)),
    Case("ipv4 connected host", v4("10.2.0.9"), (XDP_REDIRECT, "FWD_IPV4"), check=forwarded_v4(MAC_H9)),
    Case("ipv4 tcp via gateway", v4("10.20.1.2", l4=TCP(sport=1, dport=80, flags="S")),
         (XDP_REDIRECT, "FWD_IPV4")),
    Case("ipv4 icmp via gateway", v4("10.20.1.2", l4=ICMP()), (XDP_REDIRECT, "FWD_IPV4")),
    Case("ipv4 connected, neighbor unresolved", v4("10.2.0.10"), (XDP_PASS, "PASS_NO_NEIGH")),
    Case("ipv4 to the router itself", v4("10.1.0.1"), (XDP_PASS, "PASS_LOCAL"),
         kernel=(XDP_PASS, "PASS_KERNEL_NOT_FWDED")),
    Case("ipv4 to the router itself with ttl 1", v4("10.1.0.1", ttl=1), (XDP_PASS, "PASS_LOCAL"),
         kernel=(XDP_PASS, "PASS_KERNEL_NOT_FWDED")),
    Case("ipv4 blackhole", v4("10.66.0.1"), (XDP_DROP, "DROP_BLACKHOLE")),
    Case("ipv4 unreachable", v4("10.67.0.1"), (XDP_PASS, "PASS_UNREACHABLE")),
    Case("ipv4 prohibit", v4("10.68.0.1"), (XDP_PASS, "PASS_PROHIBIT")),
    Case("ipv4 no route", v4("192.0.2.77"), (XDP_PASS, "PASS_FIB_MISS"),
         kernel=(XDP_PASS, "PASS_KERNEL_NOT_FWDED")),
    Case("ipv4 multipath", v4("10.40.0.1"), (XDP_REDIRECT, "FWD_IPV4")),
    Case("ipv4 ttl 1 expires", v4("10.20.1.2", ttl=1), (XDP_PASS, "PASS_TTL_EXCEEDED")),
    Case("ipv4 ttl 0 expires", v4("10.20.1.2", ttl=0), (XDP_PASS, "PASS_TTL_EXCEEDED")),
    Case("ipv4 ttl 2 forwarded", v4("10.20.1.2", ttl=2), (XDP_REDIRECT, "FWD_IPV4")),
    Case("ipv4 larger than egress MTU", v4("10.20.1.2", size=1400), (XDP_PASS, "PASS_FRAG_NEEDED")),
    Case("ipv4 exactly egress MTU", v4("10.20.1.2", size=1400 - 28), (XDP_REDIRECT, "FWD_IPV4")),
    Case("ipv4 egress not attached to bpfrouter", v4("10.30.0.1"), (XDP_PASS, "PASS_EGRESS_UNMANAGED")),
    Case("ipv4 options go to the kernel", v4("10.20.1.2", options=[IPOption_Router_Alert()]),
         (XDP_PASS, "PASS_IP_OPTIONS")),
    Case("ipv4 non-first fragment forwarded", v4("10.20.1.2", frag=100, l4=Raw(b"frag")),
         (XDP_REDIRECT, "FWD_IPV4")),
    Case("ipv4 multicast", v4("239.1.1.1"), (XDP_PASS, "PASS_L3_MULTICAST")),
    Case("ipv6 via gateway", v6("fd20::5"), (XDP_REDIRECT, "FWD_IPV6"), check=forwarded_v6),
    Case("ipv6 hop limit 1", v6("fd20::5", hlim=1), (XDP_PASS, "PASS_TTL_EXCEEDED")),
    Case("ipv6 to the router", v6("fd01::1"), (XDP_PASS, "PASS_LOCAL"),
         kernel=(XDP_PASS, "PASS_KERNEL_NOT_FWDED")),
    Case("ipv6 blackhole", v6("fd66::1"), (XDP_DROP, "DROP_BLACKHOLE")),
    Case("ipv6 no route", v6("2001:db8::1"), (XDP_PASS, "PASS_FIB_MISS"),
         kernel=(XDP_PASS, "PASS_KERNEL_NOT_FWDED")),
    Case("ipv6 connected, neighbor unresolved", v6("fd02::77"), (XDP_PASS, "PASS_NO_NEIGH")),
    Case("ipv6 hop-by-hop goes to the kernel", v6("fd20::5", ext=IPv6ExtHdrHopByHop()),
         (XDP_PASS, "PASS_IPV6_HOP_BY_HOP")),
    Case("ipv6 link-local destination", v6("fe80::1"), (XDP_PASS, "PASS_LINK_LOCAL")),
    Case("ipv6 link-local source", v6("fd20::5", src="fe80::2"), (XDP_PASS, "PASS_LINK_LOCAL")),
    Case("ipv6 multicast", v6("ff05::1"), (XDP_PASS, "PASS_L3_MULTICAST")),
    Case("ipv6 echo request forwarded", v6("fd20::5", l4=ICMPv6EchoRequest()), (XDP_REDIRECT, "FWD_IPV6")),
    Case("ipv6 neighbor solicitation", v6("fd01::1", l4=ICMPv6ND_NS(tgt="fd01::1")), (XDP_PASS, "PASS_ND")),
    Case("arp", lambda env: bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.1.0.1")), (XDP_PASS, "PASS_ARP")),
    Case("other ethertype", lambda env: bytes(Ether(dst=env.if0_mac, type=0x88CC) / Raw(b"\0" * 46)),
         (XDP_PASS, "PASS_NON_IP")),
    Case("802.1Q tagged", lambda env: bytes(Ether(dst=env.if0_mac) / Dot1Q(vlan=10) / IP(src=SRC, dst="10.20.1.2") / UDP()),
         (XDP_PASS, "PASS_VLAN")),
    Case("802.1ad + 802.1Q tagged", lambda env: bytes(Ether(dst=env.if0_mac) / Dot1AD(vlan=100) / Dot1Q(vlan=10) /
                                                     IPv6(src=SRC6, dst="fd20::5") / UDP()),
         (XDP_PASS, "PASS_VLAN")),
    Case("broadcast MAC", lambda env: bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / IP(src=SRC, dst="10.20.1.2") / UDP()),
         (XDP_PASS, "PASS_L2_MULTICAST")),
    Case("frame for another host", lambda env: bytes(Ether(dst="02:99:99:99:99:99") / IP(src=SRC, dst="10.20.1.2") / UDP()),
         (XDP_PASS, "PASS_OTHERHOST")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_case(env, mode, case):
    frame = case.frame(env)
    res = run_packet(env, mode, frame)
    action, reason = case.expect(mode)
    assert (res.action, res.reason.name) == (action, reason)
    if action != XDP_REDIRECT:
        assert res.out == frame, "a packet that is not forwarded must reach the kernel unchanged"
    if case.check:
        case.check(env, res.out)


def test_payload_untouched_by_forwarding(env, mode):
    frame = v4("10.20.1.2", size=200)(env)
    res = run_packet(env, mode, frame)
    assert res.action == XDP_REDIRECT
    assert res.out[12:14] == frame[12:14] and res.out[14 + 20:] == frame[14 + 20:]
    # only TTL and checksum change in the IPv4 header
    diff = [i for i in range(14, 34) if res.out[i] != frame[i]]
    assert set(diff) <= {14 + 8, 14 + 10, 14 + 11}


def test_unknown_ingress_interface_is_passed_and_counted(env):
    """dpt2 runs no bpfrouter configuration: counted under ingress 0."""
    from bpfrouter import netns
    from bpfrouter.observe import read_counters
    from .harness import NS
    dp = env.dps["bpf"]
    frame = v4("10.20.1.2")(env)
    with netns.entered(NS):
        before = read_counters(dp).get((0, Reason.PASS_UNKNOWN_IFACE), (0, 0))[0]
        res = dp.program.test_run(frame, ingress_ifindex=env.ifindex["dpt2"])
        after = read_counters(dp).get((0, Reason.PASS_UNKNOWN_IFACE), (0, 0))[0]
    assert res.retval == XDP_PASS and res.data == frame and after - before == 1


def test_route_to_an_empty_nexthop_is_passed(env):
    """A route whose next hop was cleared (a transient during updates) goes to the kernel."""
    import ipaddress
    from bpfrouter.datapath import layout as lo
    from bpfrouter.fib import make_tables
    prefix = ipaddress.ip_network("10.55.0.0/16")
    for mode in ("bpf", "lpm"):
        table = make_tables(env.dps[mode])[4]
        table.set(prefix, lo.RouteValue(nh_id=60000, type=lo.RouteType.UNICAST, prefixlen=16))
        try:
            res = run_packet(env, mode, v4("10.55.0.1")(env))
            assert (res.action, res.reason.name) == (XDP_PASS, "PASS_NEXTHOP_INVALID"), mode
        finally:
            table.delete((4, int(prefix.network_address), 16))
            table.close()


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("padding", [1, 4, 18])
def test_bytes_past_the_ip_packet_are_trimmed(env, mode, family, padding):
    """As the kernel's input trims a frame to its IP length (Ethernet padding,
    or a length shorter than the frame): the forwarded frame ends with the
    IP packet."""
    frame = (v4("10.20.1.2") if family == 4 else v6("fd20::1"))(env)
    res = run_packet(env, mode, frame + b"\xee" * padding)
    assert res.action == XDP_REDIRECT
    assert len(res.out) == len(frame)
    sent = Ether(frame)
    assert bytes(Ether(res.out).payload.payload) == bytes(sent.payload.payload)
