"""The kernel's input policy in the fast path (include/kernelpolicy.h):
martians, forwarding sysctls, hairpin, rp_filter strict and loose,
accept_local, route_localnet, for each combination of the ingress's
mirrored flags. Every case reads its reason from the counters the program
moved (run_packet). tests/e2e/test_kernel_policy.py checks the same
decisions against the kernel itself."""
from __future__ import annotations

import contextlib
import ipaddress

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from bpfrouter import netns
from bpfrouter.fib import Fib, Nexthop, Route, RouteType
from bpfrouter.interfaces import IfaceFlag as F
from bpfrouter.interfaces import Interfaces, policy_flags
from bpfrouter.neighbors import Neighbors

from .harness import NS, XDP_DROP, XDP_PASS, XDP_REDIRECT, own_datapath, run_packet

n, a = ipaddress.ip_network, ipaddress.ip_address
MAC_HAIRPIN = "02:00:00:00:00:44"


@pytest.fixture(scope="module")
def policy_dp(env):
    """A BPF-FIB router with routes to the martian ranges (so only the policy
    stops them), a connected route for the ingress's subnet and one back out
    of the ingress."""
    with own_datapath(env, "policy") as dp:
        ifx = env.ifindex
        with netns.entered(NS):
            fib = Fib(dp)
            fib.recover()  # the fixture's routes and next hops stay
            for r in (Route(n("10.1.0.0/24"), RouteType.UNICAST, (Nexthop(ifx["dpt0"]),)),
                      Route(n("10.50.0.0/16"), RouteType.UNICAST, (Nexthop(ifx["dpt0"], a("10.1.0.9")),)),
                      Route(n("0.0.0.0/8"), RouteType.UNICAST, (Nexthop(ifx["dpt1"], a("10.2.0.2")),)),
                      Route(n("127.0.0.0/8"), RouteType.UNICAST, (Nexthop(ifx["dpt1"], a("10.2.0.2")),)),
                      Route(n("240.0.0.0/4"), RouteType.UNICAST, (Nexthop(ifx["dpt1"], a("10.2.0.2")),)),
                      Route(n("::/0"), RouteType.UNICAST, (Nexthop(ifx["dpt1"], a("fd02::2")),))):
                fib.update(r)
            fib.close()
            Neighbors(dp).set(ifx["dpt0"], a("10.1.0.9"), bytes.fromhex(MAC_HAIRPIN.replace(":", "")), 0x80)
        env.dps["policy"] = dp
        try:
            yield dp
        finally:
            del env.dps["policy"]


@contextlib.contextmanager
def flags_of(env, mode: str, flags: int):
    ifaces = Interfaces(env.dps[mode])
    before = ifaces.configured()[env.ifindex["dpt0"]].flags
    ifaces.set_flags(env.ifindex["dpt0"], int(flags))
    try:
        yield
    finally:
        ifaces.set_flags(env.ifindex["dpt0"], before)


def v4(env, src, dst, **kw):
    return bytes(Ether(dst=env.if0_mac) / IP(src=src, dst=dst, **kw) / UDP(sport=1, dport=2))


def v6(env, src, dst):
    return bytes(Ether(dst=env.if0_mac) / IPv6(src=src, dst=dst) / UDP(sport=1, dport=2))


STRICT, LOOSE = F.RPF_STRICT, F.RPF_LOOSE
# (source, destination, ingress flags, expected reason)
CASES4 = [
    # ip_route_input_slow's martians, before any route
    ("224.0.0.9", "10.20.1.1", 0, "DROP_MARTIAN_SOURCE"),
    ("255.255.255.255", "10.20.1.1", 0, "DROP_MARTIAN_SOURCE"),
    ("0.0.0.0", "10.20.1.1", 0, "DROP_MARTIAN_SOURCE"),
    ("0.0.0.0", "0.0.0.0", 0, "PASS_LOCAL"),            # brd_input: delivered
    ("10.1.0.2", "0.0.0.0", 0, "DROP_MARTIAN_DEST"),
    ("0.1.2.3", "10.20.1.1", 0, "FWD_IPV4"),            # only 0.0.0.0 is zeronet since Linux 5.3
    ("10.1.0.2", "0.1.2.3", 0, "FWD_IPV4"),
    ("10.1.0.2", "127.1.1.1", 0, "DROP_MARTIAN_DEST"),
    ("10.1.0.2", "127.1.1.1", F.ROUTE_LOCALNET, "FWD_IPV4"),
    ("127.0.0.5", "10.20.1.1", 0, "DROP_MARTIAN_SOURCE"),
    ("127.0.0.5", "10.20.1.1", F.ROUTE_LOCALNET, "FWD_IPV4"),
    ("240.0.0.1", "10.20.1.1", 0, "FWD_IPV4"),           # class E is unicast to Linux
    ("10.1.0.2", "240.0.0.1", 0, "FWD_IPV4"),
    # forwarding and hairpin
    ("10.1.0.2", "10.20.1.1", F.NO_FWD4, "PASS_FORWARDING_OFF"),
    ("10.1.0.2", "10.20.1.1", F.NO_FWD6, "FWD_IPV4"),
    ("10.1.0.2", "10.50.1.1", 0, "PASS_HAIRPIN"),
    # rp_filter 0: only the router's own (local-route) sources are the kernel's
    ("10.2.0.7", "10.20.1.1", 0, "FWD_IPV4"),
    ("10.99.0.1", "10.20.1.1", 0, "FWD_IPV4"),
    ("10.66.0.1", "10.20.1.1", 0, "FWD_IPV4"),
    ("10.1.0.1", "10.20.1.1", 0, "PASS_LOCAL_SOURCE"),
    ("10.1.0.1", "10.20.1.1", F.ACCEPT_LOCAL, "FWD_IPV4"),
    # strict: the route back must leave through the ingress
    ("10.1.0.2", "10.20.1.1", STRICT, "FWD_IPV4"),
    ("10.2.0.7", "10.20.1.1", STRICT, "DROP_RPFILTER"),
    ("10.99.0.1", "10.20.1.1", STRICT, "DROP_RPFILTER"),
    ("10.66.0.1", "10.20.1.1", STRICT, "DROP_RPFILTER"),
    ("10.67.0.1", "10.20.1.1", STRICT, "DROP_RPFILTER"),
    ("10.1.0.1", "10.20.1.1", STRICT, "DROP_MARTIAN_SOURCE"),
    ("10.1.0.1", "10.20.1.1", STRICT | F.ACCEPT_LOCAL, "PASS_LOCAL_SOURCE"),
    ("10.40.0.1", "10.20.1.1", STRICT, "DROP_RPFILTER"),   # a multipath route back, no path out of dpt0
    ("10.1.0.2", "10.20.1.1", STRICT | F.SOURCE_UNSURE, "PASS_SOURCE_UNVERIFIED"),
    # loose: any route back will do, unless the ingress has no IPv4 address
    ("10.2.0.7", "10.20.1.1", LOOSE, "FWD_IPV4"),
    ("10.2.0.7", "10.20.1.1", LOOSE | F.NO_ADDR4, "DROP_RPFILTER"),
    ("10.1.0.2", "10.20.1.1", LOOSE | F.NO_ADDR4, "FWD_IPV4"),
    ("10.99.0.1", "10.20.1.1", LOOSE, "DROP_RPFILTER"),
    ("10.40.0.1", "10.20.1.1", LOOSE, "FWD_IPV4"),
    # a probe of a martian still has its route: the checks follow the FIB stage
    ("10.1.0.2", "10.66.1.1", STRICT, "DROP_BLACKHOLE"),
    ("10.99.0.1", "10.67.1.1", STRICT, "PASS_UNREACHABLE"),
]

CASES6 = [
    ("ff02::1", "fd20::1", 0, "DROP_MARTIAN_SOURCE"),
    ("::1", "fd20::1", 0, "DROP_MARTIAN_SOURCE"),
    ("fd01::2", "::1", 0, "DROP_MARTIAN_DEST"),
    ("::", "fd20::1", 0, "DROP_MARTIAN_SOURCE"),
    ("::ffff:10.1.0.2", "fd20::1", 0, "FWD_IPV6"),       # v4-mapped: no longer refused (2021)
    ("fd01::2", "fd20::1", F.NO_FWD6, "PASS_FORWARDING_OFF"),
    ("fd01::2", "fd20::1", F.NO_FWD4 | STRICT, "FWD_IPV6"),  # IPv6 has no rp_filter
]


def verdict(reason: str) -> int:
    return XDP_REDIRECT if reason.startswith("FWD") else XDP_DROP if reason.startswith("DROP") else XDP_PASS


@pytest.mark.parametrize("src,dst,flags,reason", CASES4 + CASES6,
                         ids=[f"{c[0]}>{c[1]}-{int(c[2])}" for c in CASES4 + CASES6])
def test_policy_bpf_fib(env, policy_dp, src, dst, flags, reason):
    frame = v4(env, src, dst) if "." in dst and ":" not in dst else v6(env, src, dst)
    with flags_of(env, "policy", flags):
        res = run_packet(env, "policy", frame)
    assert (res.action, res.reason.name) == (verdict(reason), reason)


# --fib kernel: the route back from bpf_fib_lookup in the harness namespace
# (10.1.0.0/24 dev dpt0, 10.2.0.0/24 dev dpt1, 10.40/16 multipath, ...)
CASES_KERNEL = [
    ("10.1.0.2", 0, "FWD_IPV4"),
    ("10.1.0.2", STRICT, "FWD_IPV4"),
    ("10.2.0.7", STRICT, "PASS_SOURCE_UNVERIFIED"),   # one path's egress: cannot rule out another
    ("10.2.0.7", LOOSE, "FWD_IPV4"),
    ("10.99.0.1", LOOSE, "DROP_RPFILTER"),
    ("10.99.0.1", 0, "FWD_IPV4"),
    ("10.66.0.1", STRICT, "DROP_RPFILTER"),
    ("10.1.0.1", STRICT, "DROP_RPFILTER"),
    ("10.1.0.1", 0, "PASS_LOCAL_SOURCE"),
    ("0.0.0.0", 0, "DROP_MARTIAN_SOURCE"),
]


@pytest.fixture(scope="module")
def kernel_mirror(env):
    """The mirror the agent keeps in kernel mode too: rp_filter 0 asks it
    whether a source the kernel does not route is the router's own."""
    local = Route(n("10.1.0.1/32"), RouteType.LOCAL)
    with netns.entered(NS):
        fib = Fib(env.dps["kernel"])
        fib.recover()
        fib.update(local)
    yield
    with netns.entered(NS):
        fib.delete(local)
        fib.close()


@pytest.mark.parametrize("src,flags,reason", CASES_KERNEL, ids=[f"{c[0]}-{int(c[1])}" for c in CASES_KERNEL])
def test_policy_kernel_fib(env, kernel_mirror, src, flags, reason):
    with flags_of(env, "kernel", flags):
        res = run_packet(env, "kernel", v4(env, src, "10.20.1.1"))
    assert (res.action, res.reason.name) == (verdict(reason), reason)


def test_flags_follow_the_sysctls(env):
    """policy_flags reads conf.all and conf.<port> as the kernel combines them."""
    def sysctl(key, value):
        with open(f"/proc/sys/net/{key}", "w") as f:
            f.write(str(value))

    def read(key):
        with open(f"/proc/sys/net/{key}") as f:
            return f.read().strip()

    keys = ["ipv4/conf/all/rp_filter", "ipv4/conf/dpt0/rp_filter", "ipv4/conf/dpt0/forwarding",
            "ipv4/conf/all/accept_local", "ipv4/conf/dpt0/route_localnet", "ipv6/conf/all/forwarding"]
    with netns.entered(NS):
        saved = {k: read(k) for k in keys}
        try:
            sysctl("ipv4/conf/all/rp_filter", 1)
            sysctl("ipv4/conf/dpt0/rp_filter", 2)
            assert policy_flags("dpt0") & (STRICT | LOOSE) == LOOSE    # max(all, port)
            sysctl("ipv4/conf/dpt0/rp_filter", 0)
            assert policy_flags("dpt0") & (STRICT | LOOSE) == STRICT
            sysctl("ipv4/conf/all/rp_filter", 0)
            assert not policy_flags("dpt0") & (STRICT | LOOSE)
            sysctl("ipv4/conf/dpt0/forwarding", 0)
            sysctl("ipv4/conf/all/accept_local", 1)
            sysctl("ipv4/conf/dpt0/route_localnet", 1)
            sysctl("ipv6/conf/all/forwarding", 0)
            got = policy_flags("dpt0")
            assert got & (F.NO_FWD4 | F.ACCEPT_LOCAL | F.ROUTE_LOCALNET | F.NO_FWD6) == \
                F.NO_FWD4 | F.ACCEPT_LOCAL | F.ROUTE_LOCALNET | F.NO_FWD6
        finally:
            for k in reversed(keys):
                sysctl(k, saved[k])
