"""The kernel's input policy, by difference against the kernel: for each set
of sysctls, each frame is sent from h1 through the router once with the XDP
program detached from r-eth0 (the kernel forwards) and once attached, and
the same frames, byte for byte, must arrive at h2. The agent mirrors the
sysctls (agent/policy.py); the counters must carry the reason the fast
path claims.

Arrival is bounded by a sentinel: after each frame, a valid datagram from
h1 that every setting forwards. Both the kernel's transmit and an XDP
redirect feed h2's veth through the same ring, in order, so once the
sentinel is read every frame sent before it has arrived or never will."""
from __future__ import annotations

import socket

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpfrouter import netns
from bpfrouter.datapath import Datapath
from bpfrouter.interfaces import policy_flags
from bpfrouter.observe import read_counters
from bpfrouter.packet import mac_str

from .conftest import wait_for

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SENTINEL = b"kpolicy-sentinel"


def frames(r_mac: str) -> dict[str, bytes]:
    def v4(src, dst="10.0.2.2", l4=None, **kw):
        return bytes(Ether(dst=r_mac) / IP(src=src, dst=dst, **kw) / (l4 if l4 is not None else UDP(sport=7, dport=9) / Raw(b"x" * 8)))

    def v6(src, dst="fd00:2::2", ext=0):
        p = IPv6(src=src, dst=dst)
        for _ in range(ext):
            p = p / IPv6ExtHdrDestOpt()
        return bytes(Ether(dst=r_mac) / p / UDP(sport=7, dport=9) / Raw(b"y" * 8))

    return {
        "valid": v4("10.0.1.2"),
        "spoofed other side": v4("10.0.2.50"),     # strict fails, loose passes
        "spoofed no route": v4("10.77.0.1"),       # loose fails too
        "local source r-eth0": v4("10.0.1.1"),
        "local source r-eth1": v4("10.0.2.1"),
        "broadcast source": v4("10.0.2.255"),
        "zeronet source": v4("0.0.0.0"),
        "0/8 source": v4("0.1.2.3"),
        "loopback source": v4("127.0.0.5"),
        "multicast source": v4("224.1.1.1"),
        "limited broadcast source": v4("255.255.255.255"),
        "class E source": v4("240.0.0.1"),
        "zeronet destination": v4("10.0.1.2", dst="0.0.0.0"),
        "0/8 destination": v4("10.0.1.2", dst="0.0.0.5"),
        "bad checksum": v4("10.0.1.2", chksum=0x1234),
        "tcp doff 4": v4("10.0.1.2", l4=TCP(sport=7, dport=9, dataofs=4) / Raw(b"\0" * 8)),
        "udp length 4": v4("10.0.1.2", l4=UDP(sport=7, dport=9, len=4) / Raw(b"z" * 8)),
        "icmp 4 bytes": v4("10.0.1.2", l4=Raw(bytes(ICMP())[:4]), proto=1),
        "udp cut to 4 bytes": v4("10.0.1.2", l4=Raw(b"\x00\x07\x00\x09"), proto=17),
        "ipv6 valid": v6("fd00:1::2"),
        "ipv6 9 extension headers": v6("fd00:1::2", ext=9),
        "ipv6 loopback source": v6("::1"),
        "ipv6 multicast source": v6("ff02::1"),
        "ipv6 unspecified source": v6("::"),
    }


# sysctls of the router (under /proc/sys/net) per setting
V4, V6 = "ipv4/conf", "ipv6/conf"
SETTINGS = {
    "rp_filter 0": {},
    "rp_filter strict (port)": {f"{V4}/r-eth0/rp_filter": 1},
    "rp_filter loose (all) over strict (port)": {f"{V4}/all/rp_filter": 2, f"{V4}/r-eth0/rp_filter": 1},
    "rp_filter strict (all), accept_local": {f"{V4}/all/rp_filter": 1, f"{V4}/r-eth0/accept_local": 1},
    "route_localnet, rp_filter 0": {f"{V4}/all/route_localnet": 1},
    "IPv4 forwarding off on the ingress": {f"{V4}/r-eth0/forwarding": 0},
    "IPv6 forwarding off": {f"{V6}/all/forwarding": 0},
}
DEFAULTS = {f"{V4}/all/rp_filter": 0, f"{V4}/r-eth0/rp_filter": 0, f"{V4}/r-eth0/accept_local": 0,
            f"{V4}/all/route_localnet": 0, f"{V6}/all/forwarding": 1, f"{V4}/r-eth0/forwarding": 1}


def set_sysctls(values: dict[str, int]) -> None:
    for key, value in values.items():
        with open(f"/proc/sys/net/{key}", "w") as f:
            f.write(str(value))


class Wire:
    """h1's sending socket and h2's receiving one, both on raw Ethernet."""

    def __init__(self, lab):
        with netns.entered(lab.ns("h1")):
            self.tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self.tx.bind(("h1-eth0", 0))
        with netns.entered(lab.ns("h2")):
            self.rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.rx.bind(("h2-eth0", 0))
        self.rx.settimeout(5)
        self.sentinels: dict[int, bytes] = {}

    def through(self, frame: bytes, family: int = 4) -> list[bytes]:
        """The IP packets that reach h2 for `frame` (from the IP header on),
        bounded by a sentinel of that IP version."""
        self.tx.send(frame)
        self.tx.send(self.sentinels[family])
        got = []
        for _ in range(64):
            data, addr = self.rx.recvfrom(65535)
            if addr[2] == PACKET_OUTGOING or data[12:14] not in (b"\x08\x00", b"\x86\xdd"):
                continue
            if SENTINEL in data:
                return got
            if data[12:14] == b"\x86\xdd" and (data[38] == 0xFF or data[22:24] == b"\xfe\x80"):
                continue  # the router's own link-scope IPv6 (neighbor discovery, MLD)
            if data[12:14] == b"\x08\x00" and data[30] >= 224:
                continue  # the router's own IPv4 multicast (IGMP)
            got.append(data[14:])
        raise AssertionError("the sentinel never arrived")

    def close(self):
        self.tx.close()
        self.rx.close()


@pytest.fixture(scope="module")
def wire(bpf_router):
    lab = bpf_router.lab
    assert bpf_router.ping("h1", lab.addr("h2")) and bpf_router.ping("h1", lab.addr("h2", 6))
    lab.run("r", ["ip", "neigh", "replace", "10.0.2.2", "lladdr", mac_str(lab.link("h2", "h2-eth0")[1]),
                  "dev", "r-eth1", "nud", "permanent"], check=True)
    w = Wire(lab)
    _, r_mac = lab.link("r", "r-eth0")
    w.sentinels = {4: bytes(Ether(dst=mac_str(r_mac)) / IP(src="10.0.1.2", dst="10.0.2.2") / UDP(sport=7, dport=9) /
                            Raw(SENTINEL)),
                   6: bytes(Ether(dst=mac_str(r_mac)) / IPv6(src="fd00:1::2", dst="fd00:2::2") /
                            UDP(sport=7, dport=9) / Raw(SENTINEL))}
    w.frames = frames(mac_str(r_mac))
    yield w
    w.close()
    netns.run_in(lab.router_ns, set_sysctls, DEFAULTS)


def counts(r) -> dict[str, int]:
    """Packets per reason label on r-eth0, from the data plane's counters."""
    with netns.entered(r.lab.router_ns):
        dp = Datapath.open(r.name)
        try:
            got = read_counters(dp, socket.if_nametoindex("r-eth0"))
        finally:
            dp.close()
    out: dict[str, int] = {}
    for (_, reason), (packets, _) in got.items():
        out[reason.label] = out.get(reason.label, 0) + packets
        out["@" + reason.verdict] = out.get("@" + reason.verdict, 0) + packets
    return out


def redirected(r) -> int:
    return counts(r).get("@redirect", 0)


def mirrored(r) -> bool:
    """The agent wrote the router's sysctls into r-eth0's flags."""
    with netns.entered(r.lab.router_ns):
        ifindex = socket.if_nametoindex("r-eth0")
        dp = Datapath.open(r.name)
        try:
            got = dp.ifaces.lookup_batch()
            flags = {k.value: v.flags for k, v in got}[ifindex]
        finally:
            dp.close()
        return flags == int(policy_flags("r-eth0"))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_same_packets_arrive_as_through_the_kernel(bpf_router, wire, setting):
    r, lab = bpf_router, bpf_router.lab
    netns.run_in(lab.router_ns, set_sysctls, {**DEFAULTS, **SETTINGS[setting]})
    assert wait_for(lambda: mirrored(r), timeout=10), "the agent did not mirror the sysctls"
    # the sentinel takes the family this setting still forwards
    family = 6 if "IPv4 forwarding off" in setting else 4
    ifindex = lab.link("r", "r-eth0")[0]
    with netns.entered(lab.router_ns):
        dp = Datapath.open(r.name)
    try:
        with netns.entered(lab.router_ns):
            dp.detach(ifindex)
        try:
            kernel = {name: wire.through(f, family) for name, f in wire.frames.items()}
        finally:
            with netns.entered(lab.router_ns):
                dp.attach(ifindex, "native")
        before = redirected(r)
        fast = {name: wire.through(f, family) for name, f in wire.frames.items()}
        after = redirected(r)
    finally:
        dp.close()
    differ = [f"{name}: kernel delivered {len(kernel[name])}, bpfrouter {len(fast[name])}"
              for name in kernel if kernel[name] != fast[name]]
    assert not differ, f"{setting}: " + "; ".join(differ)
    # a difference that can fail: the fast path handled the frames (and their sentinels)
    assert after > before


def test_counters_carry_the_reasons(bpf_router, wire):
    r, lab = bpf_router, bpf_router.lab
    netns.run_in(lab.router_ns, set_sysctls, {**DEFAULTS, **SETTINGS["rp_filter strict (port)"]})
    assert wait_for(lambda: mirrored(r), timeout=10)
    want = {"spoofed other side": "rpfilter", "spoofed no route": "rpfilter", "zeronet source": "martian_source",
            "multicast source": "martian_source", "local source r-eth1": "martian_source",
            "bad checksum": "bad_checksum", "ipv6 loopback source": "martian_source",
            "ipv6 unspecified source": "martian_source"}
    for name, reason in want.items():
        before = counts(r).get(reason, 0)
        assert wire.through(wire.frames[name]) == [], name
        assert counts(r).get(reason, 0) == before + 1, f"{name}: {reason}"
    for name in ("tcp doff 4", "udp length 4", "ipv6 9 extension headers"):
        before = redirected(r)
        assert len(wire.through(wire.frames[name])) == 1, name
        assert redirected(r) == before + 2, name   # the frame and its sentinel
