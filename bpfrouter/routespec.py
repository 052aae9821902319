"""Parse iproute2-style route arguments (pure Python, no kernel access).

    [TYPE] PREFIX [via ADDR] [dev IFNAME] [metric N] [table T] [proto P]
    [TYPE] PREFIX nexthop via ADDR [dev IFNAME] nexthop via ADDR [dev IFNAME] ...

TYPE is unicast (default), local, blackhole, unreachable or prohibit;
PREFIX is an address with optional /len, or `default` (with -6 for ::/0)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ROUTE_TYPES = ("unicast", "local", "blackhole", "unreachable", "prohibit")


class RouteSpecError(ValueError):
    """One line telling the user what is wrong with the route arguments."""


@dataclass(frozen=True)
class NexthopSpec:
    gateway: IPAddress | None = None
    dev: str | None = None


@dataclass(frozen=True)
class RouteSpec:
    prefix: IPNetwork
    type: str = "unicast"
    nexthops: tuple[NexthopSpec, ...] = ()
    metric: int = 0
    table: int = 254


TABLE_NAMES = {"main": 254, "local": 255, "default": 253}


def parse_table(text: str) -> int:
    """A routing table by name (main, local, default) or number (1..4294967295)."""
    if text in TABLE_NAMES:
        return TABLE_NAMES[text]
    if not text.isdigit() or not 0 < int(text) <= 0xFFFFFFFF:
        raise RouteSpecError(f"invalid table {text!r}: expected main, local, default or 1..4294967295")
    return int(text)


def parse_prefix(text: str, family: int | None = None) -> IPNetwork:
    if text == "default":
        return ipaddress.IPv6Network("::/0") if family == 6 else ipaddress.IPv4Network("0.0.0.0/0")
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise RouteSpecError(f"invalid prefix {text!r}: expected e.g. 10.0.0.0/8, 2001:db8::/32 or default") from None
    if "/" in text and net.network_address != ipaddress.ip_interface(text).ip:
        raise RouteSpecError(f"invalid prefix {text!r}: host bits are set (did you mean {net}?)")
    return net


def parse_address(text: str, what: str = "address") -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise RouteSpecError(f"invalid {what} {text!r}") from None


def _take(tokens: list[str], i: int, keyword: str) -> str:
    if i + 1 >= len(tokens):
        raise RouteSpecError(f"{keyword!r} needs a value")
    return tokens[i + 1]


def _parse_nexthop(tokens: list[str], i: int, stop: set[str]) -> tuple[NexthopSpec, int]:
    gw = dev = None
    while i < len(tokens) and tokens[i] not in stop:
        word = tokens[i]
        if word == "via":
            value = _take(tokens, i, word)
            if value in ("inet", "inet6"):  # `via inet6 ADDR`
                i += 1
                value = _take(tokens, i, word)
            gw = parse_address(value, "gateway")
            i += 2
        elif word == "dev":
            dev = _take(tokens, i, word)
            i += 2
        else:
            return NexthopSpec(gw, dev), i
    return NexthopSpec(gw, dev), i


def parse_route(tokens: list[str] | tuple[str, ...], family: int | None = None,
                need_target: bool = True) -> RouteSpec:
    """Parse route arguments. need_target=False allows a bare prefix (route del)."""
    tokens = list(tokens)
    if not tokens:
        raise RouteSpecError("missing prefix: e.g. `route add 10.0.0.0/8 via 192.0.2.1`")
    rtype = "unicast"
    if tokens[0] in ROUTE_TYPES:
        rtype = tokens.pop(0)
        if not tokens:
            raise RouteSpecError(f"missing prefix after {rtype!r}")
    if tokens[0] in ("to",):
        tokens.pop(0)
    prefix = parse_prefix(tokens[0], family)
    i = 1
    nexthops: list[NexthopSpec] = []
    metric = 0
    table = TABLE_NAMES["main"]
    while i < len(tokens):
        word = tokens[i]
        if word in ("via", "dev"):
            nh, i = _parse_nexthop(tokens, i, {"metric", "nexthop", "proto", "table"})
            nexthops.append(nh)
        elif word == "nexthop":
            nh, i = _parse_nexthop(tokens, i + 1, {"nexthop", "metric", "proto", "table"})
            if nh.gateway is None and nh.dev is None:
                raise RouteSpecError("'nexthop' needs 'via ADDR' and/or 'dev IFNAME'")
            nexthops.append(nh)
        elif word in ("metric", "preference", "priority"):
            value = _take(tokens, i, word)
            if not value.isdigit() or int(value) > 0xFFFFFFFF:
                raise RouteSpecError(f"invalid metric {value!r}: expected 0..4294967295")
            metric = int(value)
            i += 2
        elif word == "proto":
            _take(tokens, i, word)
            i += 2
        elif word == "table":
            table = parse_table(_take(tokens, i, word))
            i += 2
        else:
            raise RouteSpecError(f"unexpected {word!r}: expected via, dev, nexthop, metric or table")
    for nh in nexthops:
        if nh.gateway is not None and nh.gateway.version != prefix.version:
            raise RouteSpecError(f"an IPv{prefix.version} route via IPv{nh.gateway.version} gateway "
                                 f"{nh.gateway} is not supported")
    if rtype == "unicast" and need_target and not nexthops:
        raise RouteSpecError(f"route to {prefix} needs 'via ADDR' or 'dev IFNAME' "
                             f"(or a type: blackhole, unreachable, prohibit, local)")
    if rtype != "unicast" and any(nh.gateway for nh in nexthops):
        raise RouteSpecError(f"a {rtype} route takes no gateway")
    return RouteSpec(prefix, rtype, tuple(nexthops), metric, table)
