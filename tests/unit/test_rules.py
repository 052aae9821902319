"""Which ports the kernel's rules could route other than local-then-main
(agent/rules.py), rule by rule. The e2e tests (tests/e2e/test_kernel_only.py)
check the same with real rules and traffic."""
import pytest

from bpfrouter.agent.rules import Port, affected_ports, rule_from_msg

SUPPRESS_NONE = ("FRA_SUPPRESS_PREFIXLEN", 0xFFFFFFFF)


def msg(pref: int, table: int, *attrs, action=1, flags=0, src_len=0, dst_len=0, tos=0, family=2):
    """A rule as pyroute2 gives it (fibmsg), with the kernel's usual attributes."""
    a = [("FRA_TABLE", table), SUPPRESS_NONE, ("FRA_PROTOCOL", 2)] + ([("FRA_PRIORITY", pref)] if pref else [])
    return rule_from_msg({"family": family, "table": min(table, 255), "action": action, "flags": flags,
                          "src_len": src_len, "dst_len": dst_len, "tos": tos, "attrs": a + list(attrs)})


DEFAULTS = [msg(0, 255), msg(32766, 254), msg(32767, 253)]
PORTS = [Port(2, "r-eth0", None), Port(3, "r-eth1", None), Port(4, "r-eth2", "vrf-blue")]
ALL = {2, 3, 4}


@pytest.mark.parametrize("extra, want", [
    ([], set()),
    ([msg(100, 100, ("FRA_SRC", "10.0.1.0"), ("FRA_DST", "10.88.0.0"), src_len=24, dst_len=16)], ALL),
    ([msg(100, 100, ("FRA_IIFNAME", "r-eth1"))], {3}),
    ([msg(100, 100, ("FRA_IIFNAME", "vrf-blue"))], {4}),     # a port's master is its packets' iif
    ([msg(100, 100, ("FRA_IIFNAME", "gone0"))], set()),      # no such device: matches nothing
    ([msg(100, 100, ("FRA_IIFNAME", "lo"))], set()),         # locally generated only
    ([msg(100, 100, ("FRA_IIFNAME", "r-eth1"), flags=2)], ALL),  # not iif r-eth1
    ([msg(1000, 0, ("FRA_L3MDEV", 1))], {4}),                # the VRF rule: enslaved ports
    ([msg(100, 100, ("FRA_OIFNAME", "r-eth1"))], set()),     # forwarded packets have no oif
    ([msg(100, 100, ("FRA_OIFNAME", "r-eth1"), flags=2)], ALL),
    ([msg(100, 100, ("FRA_FWMARK", 1))], ALL),
    ([msg(100, 254, ("FRA_SUPPRESS_PREFIXLEN", 0))], ALL),  # lookup main, but not as the fast path does
    ([msg(100, 0, action=6)], ALL),                         # blackhole for everything
    ([msg(40000, 100, ("FRA_SRC", "10.0.1.0"), src_len=24)], set()),  # behind main: misses and throws only
])
def test_rules_before_main_decide(extra, want):
    assert affected_ports(DEFAULTS + extra, PORTS)[0] == want


def test_without_the_main_rule_or_with_main_before_local_every_port_is_passed():
    assert affected_ports([msg(0, 255), msg(32767, 253)], PORTS)[0] == ALL
    assert affected_ports([msg(32766, 254), msg(40000, 255)], PORTS)[0] == ALL


def test_reason_names_the_rule():
    _, why = affected_ports(DEFAULTS + [msg(100, 100, ("FRA_IIFNAME", "r-eth1"))], PORTS)
    assert why == "rule 100 (iif r-eth1)"
    assert affected_ports(DEFAULTS, PORTS)[1] is None
