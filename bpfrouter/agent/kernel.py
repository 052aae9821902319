"""Translate rtnetlink messages (pyroute2) into the domain's objects."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..fib import TABLE_LOCAL, TABLE_MAIN, Nexthop, Route, RouteType
from ..routespec import IPAddress

RTN = {1: RouteType.UNICAST, 2: RouteType.LOCAL, 3: RouteType.LOCAL, 4: RouteType.LOCAL,
       6: RouteType.BLACKHOLE, 7: RouteType.UNREACHABLE, 8: RouteType.PROHIBIT}
RTM_F_CLONED = 0x200


def route_table(msg) -> int:
    return msg.get_attr("RTA_TABLE") or msg["table"]


def route_prefix(msg):
    dst = msg.get_attr("RTA_DST")
    if dst is None:
        dst = "0.0.0.0" if msg["family"] == 2 else "::"
    return ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)


def _gateway(attrs_get) -> IPAddress | None:
    gw = attrs_get("RTA_GATEWAY")
    if gw:
        return ipaddress.ip_address(gw)
    via = attrs_get("RTA_VIA")  # IPv4 route via an IPv6 gateway (RFC 5549)
    if via and isinstance(via, dict) and via.get("addr"):
        return ipaddress.ip_address(via["addr"])
    return None


def route_from_msg(msg) -> Route | None:
    """A kernel route we mirror, or None for ones we leave to the kernel."""
    table = route_table(msg)
    if table not in (TABLE_MAIN, TABLE_LOCAL) or msg["flags"] & RTM_F_CLONED:
        return None
    rtype = RTN.get(msg["type"])
    if rtype is None:  # multicast, throw, nat
        return None
    nexthops: list[Nexthop] = []
    multipath = msg.get_attr("RTA_MULTIPATH")
    if multipath:
        for hop in multipath:
            attrs = dict(hop.get("attrs", []))
            nexthops.append(Nexthop(hop["oif"], _gateway(attrs.get)))
    elif rtype == RouteType.UNICAST:
        oif = msg.get_attr("RTA_OIF")
        if not oif:
            return None
        nexthops.append(Nexthop(oif, _gateway(msg.get_attr)))
    return Route(route_prefix(msg), rtype, tuple(nexthops), msg["proto"],
                 msg.get_attr("RTA_PRIORITY") or 0, table)


def neigh_from_msg(msg) -> tuple[int, IPAddress, bytes | None, int] | None:
    dst = msg.get_attr("NDA_DST")
    if not dst:
        return None
    addr = ipaddress.ip_address(dst)
    if addr.is_multicast:
        return None
    lladdr = msg.get_attr("NDA_LLADDR")
    mac = bytes.fromhex(lladdr.replace(":", "")) if lladdr else None
    return msg["ifindex"], addr, mac, msg["state"]


@dataclass(frozen=True)
class LinkInfo:
    ifindex: int
    name: str
    mac: bytes
    mtu: int
    up: bool


def link_from_msg(msg) -> LinkInfo:
    addr = msg.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00"
    return LinkInfo(msg["index"], msg.get_attr("IFLA_IFNAME"), bytes.fromhex(addr.replace(":", "")),
                    msg.get_attr("IFLA_MTU") or 1500, bool(msg["flags"] & 1))
