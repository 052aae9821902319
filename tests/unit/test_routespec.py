import ipaddress

import pytest

from bpfrouter.routespec import NexthopSpec, RouteSpecError, parse_route

A = ipaddress.ip_address
N = ipaddress.ip_network


@pytest.mark.parametrize("args,prefix,rtype,nexthops", [
    ("10.0.0.0/8 via 192.0.2.1 dev eth1", "10.0.0.0/8", "unicast", [NexthopSpec(A("192.0.2.1"), "eth1")]),
    ("10.0.0.0/8 via 192.0.2.1", "10.0.0.0/8", "unicast", [NexthopSpec(A("192.0.2.1"))]),
    ("192.0.2.0/24 dev eth0", "192.0.2.0/24", "unicast", [NexthopSpec(None, "eth0")]),
    ("10.1.2.3 via 192.0.2.1", "10.1.2.3/32", "unicast", [NexthopSpec(A("192.0.2.1"))]),
    ("blackhole 10.66.0.0/16", "10.66.0.0/16", "blackhole", []),
    ("unreachable 2001:db8::/32", "2001:db8::/32", "unreachable", []),
    ("prohibit 10.0.0.0/8", "10.0.0.0/8", "prohibit", []),
    ("default via 192.0.2.1", "0.0.0.0/0", "unicast", [NexthopSpec(A("192.0.2.1"))]),
    ("2001:db8::/32 via fe80::1 dev eth0", "2001:db8::/32", "unicast", [NexthopSpec(A("fe80::1"), "eth0")]),
    ("10.0.0.0/8 nexthop via 192.0.2.1 nexthop via 192.0.2.2", "10.0.0.0/8", "unicast",
     [NexthopSpec(A("192.0.2.1")), NexthopSpec(A("192.0.2.2"))]),
])
def test_parses(args, prefix, rtype, nexthops):
    spec = parse_route(args.split())
    assert spec.prefix == N(prefix) and spec.type == rtype and list(spec.nexthops) == nexthops


def test_default_v6():
    assert parse_route(["default", "via", "fd00::1"], family=6).prefix == N("::/0")


def test_metric():
    assert parse_route("10.0.0.0/8 dev eth0 metric 100".split()).metric == 100


@pytest.mark.parametrize("args,message", [
    ("", "missing prefix"),
    ("10.0.0.300/8 via 1.2.3.4", "invalid prefix"),
    ("10.0.0.1/8 via 1.2.3.4", "host bits are set"),
    ("10.0.0.0/8", "needs 'via ADDR' or 'dev IFNAME'"),
    ("10.0.0.0/8 via", "'via' needs a value"),
    ("10.0.0.0/8 via notanip", "invalid gateway"),
    ("10.0.0.0/8 via 1.2.3.4 bogus", "unexpected 'bogus'"),
    ("10.0.0.0/8 dev eth0 metric x", "invalid metric"),
    ("blackhole 10.0.0.0/8 via 1.2.3.4", "takes no gateway"),
    ("2001:db8::/32 via 1.2.3.4", "is not supported"),
    ("10.0.0.0/8 via inet6 fe80::1 dev eth0", "is not supported"),
    ("10.0.0.0/8 dev eth0 table 0", "invalid table '0'"),
    ("10.0.0.0/8 dev eth0 table blue", "invalid table 'blue'"),
])
def test_errors_are_one_line(args, message):
    with pytest.raises(RouteSpecError) as e:
        parse_route(args.split())
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bare_prefix_for_delete():
    assert parse_route(["10.0.0.0/8"], need_target=False).prefix == N("10.0.0.0/8")
