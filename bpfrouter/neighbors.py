"""The neighbor map: kernel neighbor entries (IP -> MAC per interface)."""
from __future__ import annotations

import ipaddress

from .datapath import Datapath
from .datapath import layout as lo
from .routespec import IPAddress

# Kernel NUD states whose MAC is usable for forwarding.
NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT


def neigh_key(ifindex: int, addr: IPAddress) -> lo.NeighKey:
    fam = lo.AF_INET if addr.version == 4 else lo.AF_INET6
    return lo.NeighKey(ifindex, fam, (lo.u8 * 16)(*addr.packed.ljust(16, b"\0")))


def key_addr(k: lo.NeighKey) -> IPAddress:
    raw = bytes(k.addr)
    return ipaddress.ip_address(raw[:4] if k.family == lo.AF_INET else raw)


class Neighbors:
    def __init__(self, dp: Datapath):
        self.dp = dp

    def set(self, ifindex: int, addr: IPAddress, mac: bytes | None, state: int) -> None:
        """Mirror one kernel entry; an unusable one (no MAC, failed) is removed."""
        key = neigh_key(ifindex, addr)
        if mac and len(mac) == 6 and state & NUD_VALID:
            self.dp.neighbors.update(key, lo.Neigh((lo.u8 * 6)(*mac), state))
        else:
            self.dp.neighbors.delete(key)

    def delete(self, ifindex: int, addr: IPAddress) -> None:
        self.dp.neighbors.delete(neigh_key(ifindex, addr))

    def replace_all(self, entries: list[tuple[int, IPAddress, bytes | None, int]]) -> None:
        wanted = {}
        for ifindex, addr, mac, state in entries:
            if mac and len(mac) == 6 and state & NUD_VALID:
                wanted[bytes(neigh_key(ifindex, addr))] = (ifindex, addr, mac, state)
        for k, _ in self.dp.neighbors.lookup_batch():
            if bytes(k) not in wanted:
                self.dp.neighbors.delete(k)
        for ifindex, addr, mac, state in wanted.values():
            self.set(ifindex, addr, mac, state)

    def entries(self) -> list[tuple[int, IPAddress, bytes, int]]:
        return [(k.ifindex, key_addr(k), bytes(v.mac), v.state) for k, v in self.dp.neighbors.lookup_batch()]
