"""Routes only the kernel can route (RTYPE_KERNEL) and ports passed for
policy routing (IFACE_F_PASS_POLICY*), through BPF_PROG_TEST_RUN: passed
untouched, with the reason the entry or the port carries."""
import ipaddress

import pytest

from bpfrouter.datapath import layout as lo
from bpfrouter.datapath.layout import Reason
from bpfrouter.fib import kernel_route_bits, make_tables
from bpfrouter.interfaces import Interfaces
from bpfrouter import netns

from .harness import NS, XDP_PASS, run_packet
from .test_forwarding import v4, v6


def word(prefix, bits: int) -> int:
    return int(lo.RouteType.KERNEL) << 32 | prefix.prefixlen << 40 | 3 << 48 | bits


@pytest.mark.parametrize("fib", ["bpf", "lpm"])
@pytest.mark.parametrize("bits, reason", [
    (kernel_route_bits(Reason.PASS_ENCAP, 1, 1), Reason.PASS_ENCAP),        # encap mpls
    (kernel_route_bits(Reason.PASS_ROUTE_TYPE, 9), Reason.PASS_ROUTE_TYPE),  # throw
    # bits that name no pass reason (a drop, or nothing) still pass: never a drop from an entry's bits
    (int(Reason.DROP_BLACKHOLE), Reason.PASS_ROUTE_TYPE),
    (0, Reason.PASS_ROUTE_TYPE),
    (int(Reason.FWD_IPV4), Reason.PASS_ROUTE_TYPE),
])
def test_kernel_route_is_passed_with_its_reason(env, fib, bits, reason):
    tables = make_tables(env.dps[fib])
    p4, p6 = ipaddress.ip_network("10.56.0.0/16"), ipaddress.ip_network("fd56::/32")
    try:
        for p in (p4, p6):
            tables[p.version].set_key(int(p.network_address), p.prefixlen, word(p, bits))
        for frame in (v4("10.56.0.1")(env), v6("fd56::1")(env)):
            res = run_packet(env, fib, frame)
            assert (res.action, res.reason, res.out) == (XDP_PASS, reason, frame)
    finally:
        for p in (p4, p6):
            tables[p.version].delete((p.version, int(p.network_address), p.prefixlen))
        for t in tables.values():
            t.close()


def set_policy(env, mode: str, flags: int) -> None:
    with netns.entered(NS):
        Interfaces(env.dps[mode]).set_rule_pass_flags({env.ifindex["dpt0"]: flags})


@pytest.mark.parametrize("fib", ["bpf", "lpm"])
def test_port_passed_for_policy_routing_per_family(env, fib):
    try:
        set_policy(env, fib, lo.IFACE_F_PASS_POLICY4)
        frame = v4("10.20.1.2")(env)
        res = run_packet(env, fib, frame)
        assert (res.action, res.reason, res.out) == (XDP_PASS, Reason.PASS_POLICY, frame)
        assert run_packet(env, fib, v6("fd20::1")(env)).reason == Reason.FWD_IPV6
        on_dpt1 = env.mac["dpt1"] + v4("10.20.1.2")(env)[6:]
        # another port: routed (back out of dpt1, so the kernel policy passes it as a hairpin)
        assert run_packet(env, fib, on_dpt1, iif="dpt1").reason == Reason.PASS_HAIRPIN
        set_policy(env, fib, lo.IFACE_F_PASS_POLICY6)
        assert run_packet(env, fib, v6("fd20::1")(env)).reason == Reason.PASS_POLICY
        assert run_packet(env, fib, v4("10.20.1.2")(env)).reason == Reason.FWD_IPV4
    finally:
        set_policy(env, fib, 0)


def test_policy_flags_leave_kernel_fib_mode_alone(env):
    """bpf_fib_lookup applies the kernel's rules itself."""
    try:
        set_policy(env, "kernel", lo.IFACE_F_PASS_POLICY4 | lo.IFACE_F_PASS_POLICY6)
        assert run_packet(env, "kernel", v4("10.20.1.2")(env)).reason != Reason.PASS_POLICY
    finally:
        set_policy(env, "kernel", 0)


def test_configure_keeps_policy_flags(env):
    dp = env.dps["bpf"]
    try:
        set_policy(env, "bpf", lo.IFACE_F_PASS_POLICY4)
        with netns.entered(NS):
            Interfaces(dp).configure(env.ifindex["dpt0"], env.mac["dpt0"], 1500)
            assert Interfaces(dp).configured()[env.ifindex["dpt0"]].flags == lo.IFACE_F_PASS_POLICY4
    finally:
        set_policy(env, "bpf", 0)
