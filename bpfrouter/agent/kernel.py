"""Translate link and neighbor messages (pyroute2) into the domain's objects.
Route messages go through agent/rtnl.py's decoder, on every path."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..routespec import IPAddress

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


IFF_UP, IFF_LOWER_UP = 0x1, 0x10000


@dataclass(frozen=True)
class LinkInfo:
    ifindex: int
    name: str
    mac: bytes
    mtu: int
    up: bool
    state: tuple = ()  # (IFF_UP and IFF_LOWER_UP bits, operstate): what the kernel's routes follow
    group: int = 0     # the device group (`ip link set ... group`), for suppress_ifgroup rules


def link_from_msg(msg) -> LinkInfo:
    addr = msg.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00"
    return LinkInfo(msg["index"], msg.get_attr("IFLA_IFNAME"), bytes.fromhex(addr.replace(":", "")),
                    msg.get_attr("IFLA_MTU") or 1500, bool(msg["flags"] & IFF_UP),
                    (msg["flags"] & (IFF_UP | IFF_LOWER_UP), msg.get_attr("IFLA_OPERSTATE")),
                    msg.get_attr("IFLA_GROUP") or 0)
