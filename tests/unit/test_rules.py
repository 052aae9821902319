"""The rule compiler (bpfrouter/policy/rules.py): which rule sets the fast
path walks, which rules it leaves out, and what it refuses. What the walk
decides is checked against the kernel in tests/e2e/test_policy_differential.py."""
import ipaddress
import struct

import pytest

from bpfrouter.datapath import layout as lo
from bpfrouter.policy.rules import (AF_INET, AF_INET6, FR_ACT_BLACKHOLE, FR_ACT_GOTO, FR_ACT_NOP, FR_ACT_TO_TBL, Port,
                                    Rule, Unsupported, compile_rules, rule_from_bytes)

LOCAL, MAIN, DEFAULT = Rule(AF_INET, 0, FR_ACT_TO_TBL, 255), Rule(AF_INET, 32766, FR_ACT_TO_TBL, 254), \
    Rule(AF_INET, 32767, FR_ACT_TO_TBL, 253)
PORTS = [Port(2, "r-eth0", None), Port(3, "r-eth1", None)]


def rules(*extra: Rule) -> list[Rule]:
    return sorted([LOCAL, *extra, MAIN, DEFAULT], key=lambda r: r.priority)


def test_defaults_need_no_walk():
    assert compile_rules(rules(), PORTS) is None
    assert compile_rules([Rule(AF_INET6, 0, FR_ACT_TO_TBL, 255), Rule(AF_INET6, 32766, FR_ACT_TO_TBL, 254)],
                         PORTS) is None


def test_a_custom_rule_is_walked():
    c = compile_rules(rules(Rule(AF_INET, 100, FR_ACT_TO_TBL, 100, src=ipaddress.ip_network("10.1.0.0/16"))), PORTS)
    assert [r.priority for r in c.rules] == [0, 100, 32766, 32767]
    assert c.fields == lo.RuleField.SRC
    assert [a.table for a in c.actions] == [255, 100, 254, 253]
    # 10.1.0.0/16's vector holds every rule; the miss vector all but rule 100
    assert int.from_bytes(c.vectors[c.prefixes[(0, ipaddress.ip_network("10.1.0.0/16"))]], "little") == 0b1111
    assert int.from_bytes(c.vectors[c.miss[0]], "little") == 0b1101


@pytest.mark.parametrize("extra, why", [
    ([Rule(AF_INET, 0, FR_ACT_TO_TBL, 254)], "first rule is not `lookup local`"),
    ([Rule(AF_INET, 100, FR_ACT_TO_TBL, 100, unknown=("dscp",))], "selects on dscp"),
    ([Rule(AF_INET, 100, FR_ACT_TO_TBL, 0, l3mdev=True)], "l3mdev"),
    ([Rule(AF_INET, 100 + i, FR_ACT_TO_TBL, 100, mark=1, mask=m) for i, m in enumerate((1, 2, 4, 8, 16))], "masks"),
])
def test_what_the_walk_cannot_follow(extra, why):
    ports = PORTS + [Port(4, "r-eth2", "vrf-blue")]
    rs = extra + [LOCAL, MAIN] if extra[0].priority == 0 else rules(*extra)
    with pytest.raises(Unsupported, match=why):
        compile_rules(rs, ports)


@pytest.mark.parametrize("rule, kept", [
    (Rule(AF_INET, 100, FR_ACT_TO_TBL, 100, oif="r-eth1"), False),              # no oif on input
    (Rule(AF_INET, 100, FR_ACT_TO_TBL, 100, oif="r-eth1", invert=True), True),  # ... so `not oif` always matches
    (Rule(AF_INET, 100, FR_ACT_TO_TBL, 100, iif="nosuch0"), False),             # names no port
    (Rule(AF_INET, 100, FR_ACT_TO_TBL, 100, uid=(1, 100)), False),              # forwarded packets are uid 0
    (Rule(AF_INET, 100, FR_ACT_TO_TBL, 100, uid=(0, 100)), True),
    (Rule(AF_INET, 100, FR_ACT_TO_TBL, 100, tun_id=7), False),
    (Rule(AF_INET, 100, FR_ACT_NOP), False),                                     # never decides
    (Rule(AF_INET, 100, FR_ACT_TO_TBL, 0), False),                               # no table 0: -EAGAIN
    (Rule(AF_INET, 100, FR_ACT_BLACKHOLE, iif="r-eth1"), True),
])
def test_rules_decided_at_compile_time(rule, kept):
    c = compile_rules(rules(rule), PORTS)
    assert (100 in [r.priority for r in c.rules]) == kept
    if kept and rule.oif:  # constant: in every vector, not inverted
        assert c.invert == 0 and c.fields == 0


def test_goto_lands_on_the_next_kept_rule():
    c = compile_rules(rules(Rule(AF_INET, 10, FR_ACT_GOTO, goto=20, src=ipaddress.ip_network("10.0.0.0/8")),
                            Rule(AF_INET, 20, FR_ACT_TO_TBL, 100, oif="x"),  # left out
                            Rule(AF_INET, 30, FR_ACT_TO_TBL, 101)), PORTS)
    assert [r.priority for r in c.rules] == [0, 10, 30, 32766, 32767]
    assert c.actions[1].kind == lo.RuleKind.GOTO and c.actions[1].target == 2


def test_port_ranges_become_intervals():
    c = compile_rules(rules(Rule(AF_INET, 100, FR_ACT_TO_TBL, 100, ipproto=6, dport=(1000, 1999)),
                            Rule(AF_INET, 101, FR_ACT_TO_TBL, 101, dport=(1500, 1500))), PORTS)
    assert [b for b, _ in c.bounds[1]] == [0, 1000, 1500, 1501, 2000]
    vec = {b: int.from_bytes(c.vectors[v], "little") for b, v in c.bounds[1]}
    assert vec[1500] == 0b11111 and vec[1000] == 0b11011 and vec[2000] == 0b11001


def test_rule_from_the_kernels_bytes():
    attr = lambda t, v: struct.pack("=HH", 4 + len(v), t) + v + b"\0" * (-len(v) % 4)  # noqa: E731
    body = struct.pack("=BBBBBBBBI", AF_INET, 0, 8, 0x10, 100, 0, 0, FR_ACT_TO_TBL, 2) + \
        attr(6, struct.pack("=I", 200)) + attr(2, bytes([10, 0, 0, 0])) + attr(10, struct.pack("=I", 5)) + \
        attr(16, struct.pack("=I", 0xFF)) + attr(3, b"r-eth0\0") + attr(22, bytes([17])) + \
        attr(24, struct.pack("=HH", 53, 53)) + attr(29, struct.pack("=H", 0xFFFF)) + \
        attr(14, struct.pack("=I", 0xFFFFFFFF)) + attr(21, bytes([4]))
    r = rule_from_bytes(body)
    assert r == Rule(AF_INET, 200, FR_ACT_TO_TBL, 100, src=ipaddress.ip_network("10.0.0.0/8"), tos=0x10, iif="r-eth0",
                     mark=5, mask=0xFF, ipproto=17, dport=(53, 53), invert=True, protocol=4)
    assert r.text() == "not from 10.0.0.0/8 tos 0x10 fwmark 0x5/0xff iif r-eth0 ipproto 17 dport 53 lookup 100"
    assert rule_from_bytes(body + attr(29, struct.pack("=H", 0xFF))).unknown == ("dport mask",)
