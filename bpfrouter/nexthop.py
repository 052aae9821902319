"""A next hop (a device, and a gateway or none) and its entry in the
`nexthops` map. Light to import: the CLI's `route get` and `explain` read
entries without the FIB's writers."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .datapath import layout as lo
from .routespec import IPAddress


@dataclass(frozen=True)
class Nexthop:
    ifindex: int
    gateway: IPAddress | None = None

    def __post_init__(self):
        # ipaddress objects do not cache their hash; this one is hashed per route
        object.__setattr__(self, "_hash", hash((self.ifindex, int(self.gateway) if self.gateway is not None else -1)))

    def __hash__(self) -> int:
        return self._hash


def nexthop_value(nh: Nexthop) -> lo.NexthopValue:
    v = lo.NexthopValue(ifindex=nh.ifindex)
    if nh.gateway is not None:
        v.flags = lo.NEXTHOP_F_GATEWAY
        v.family = lo.AF_INET if nh.gateway.version == 4 else lo.AF_INET6
        packed = nh.gateway.packed
        v.gw = (lo.u8 * 16)(*packed.ljust(16, b"\0"))
    return v


def nexthop_of_value(v: lo.NexthopValue) -> Nexthop:
    gw = None
    if v.flags & lo.NEXTHOP_F_GATEWAY:
        raw = bytes(v.gw)
        gw = ipaddress.ip_address(raw[:4] if v.family == lo.AF_INET else raw)
    return Nexthop(v.ifindex, gw)
