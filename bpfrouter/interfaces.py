"""Interfaces the data plane is attached to: the `ifaces` map and the devmap."""
from __future__ import annotations

import socket

from .datapath import Datapath
from .datapath import layout as lo


POLICY_FLAGS = lo.IFACE_F_PASS_POLICY4 | lo.IFACE_F_PASS_POLICY6


class InterfaceError(Exception):
    pass


class Interfaces:
    def __init__(self, dp: Datapath):
        self.dp = dp

    def configured(self) -> dict[int, lo.Iface]:
        return {k.value: v for k, v in self.dp.ifaces.lookup_batch()}

    def configure(self, ifindex: int, mac: bytes, mtu: int) -> int:
        """Add or refresh one interface; returns its counter slot."""
        current = self.configured()
        flags = 0
        if ifindex in current:
            slot = current[ifindex].slot
            flags = current[ifindex].flags & POLICY_FLAGS  # the agent's, kept across refreshes
        else:
            used = {v.slot for v in current.values()}
            free = [s for s in range(1, lo.MAX_IFACES) if s not in used]
            if not free:
                raise InterfaceError(f"at most {lo.MAX_IFACES - 1} interfaces per router")
            slot = free[0]
        # devmap first: once `ifaces` lists it, the program may redirect to it.
        self.dp.tx_ports.update(lo.u32(ifindex), lo.u32(ifindex))
        self.dp.ifaces.update(lo.u32(ifindex), lo.Iface(slot=slot, mtu=mtu, mac=(lo.u8 * 6)(*mac), flags=flags))
        return slot

    def set_policy_flags(self, flags: dict[int, int]) -> list[int]:
        """Set the IFACE_F_PASS_POLICY* bits of configured ports; returns those changed."""
        changed = []
        for ifindex, v in self.configured().items():
            want = (v.flags & ~POLICY_FLAGS) | (flags.get(ifindex, 0) & POLICY_FLAGS)
            if want != v.flags:
                v.flags = want
                self.dp.ifaces.update(lo.u32(ifindex), v)
                changed.append(ifindex)
        return changed

    def remove(self, ifindex: int) -> None:
        self.dp.ifaces.delete(lo.u32(ifindex))
        self.dp.tx_ports.delete(lo.u32(ifindex))


def ifname(ifindex: int) -> str:
    """The interface's name in the current namespace, or if<N> when it has none."""
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"if{ifindex}"
