"""Interfaces the data plane is attached to: the `ifaces` map and the devmap,
and the kernel's policy for what each receives (forwarding, rp_filter,
accept_local, route_localnet), mirrored into the map's flags."""
from __future__ import annotations

import enum
import socket
from pathlib import Path

from .datapath import Datapath
from .datapath import layout as lo


# the bits the rule mirror owns (agent/rules.py): passed or walked families
RULE_PASS_FLAGS = lo.IFACE_F_PASS_POLICY4 | lo.IFACE_F_PASS_POLICY6 | lo.IFACE_F_RULES4 | lo.IFACE_F_RULES6
# the load balancer's (lb/image.py): families with services
LB_FLAGS = lo.IFACE_F_LB4 | lo.IFACE_F_LB6
# bits no sysctl sets; the sysctl mirror (agent/policy.py) keeps them
OWNED_FLAGS = RULE_PASS_FLAGS | LB_FLAGS


class InterfaceError(Exception):
    pass


class IfaceFlag(enum.IntFlag):
    """bpf/include/iface.h enum iface_flag; 0 is the kernel's default."""
    NO_FWD4 = 1 << 0
    NO_FWD6 = 1 << 1
    RPF_STRICT = 1 << 2
    RPF_LOOSE = 1 << 3
    ACCEPT_LOCAL = 1 << 4
    ROUTE_LOCALNET = 1 << 5
    NO_ADDR4 = 1 << 6
    SOURCE_UNSURE = 1 << 7


SYSCTL = Path("/proc/sys/net")


def _sysctl(path: str) -> int:
    """An integer sysctl of the current network namespace; a device that went
    away reads as 0 (its entry goes with the next link event)."""
    try:
        return int((SYSCTL / path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def policy_flags(name: str, has_addr4: bool = True, source_unsure: bool = False,
                 custom_rules: bool = False) -> IfaceFlag:
    """The flags of port `name` as the kernel combines conf.all and conf.<name>
    (include/linux/inetdevice.h: forwarding is the port's own, rp_filter the
    larger, accept_local and route_localnet either; IPv6 forwards on
    conf.all.forwarding: force_forwarding alone is left to the kernel)."""
    v4, v6 = f"ipv4/conf/{name}", f"ipv6/conf/{name}"
    flags = IfaceFlag(0)
    if not _sysctl(f"{v4}/forwarding"):
        flags |= IfaceFlag.NO_FWD4
    if not _sysctl("ipv6/conf/all/forwarding") or _sysctl(f"{v6}/disable_ipv6") \
            or _sysctl("ipv6/conf/all/disable_ipv6"):
        flags |= IfaceFlag.NO_FWD6
    rpf = max(_sysctl("ipv4/conf/all/rp_filter"), _sysctl(f"{v4}/rp_filter"))
    if rpf == 1:
        flags |= IfaceFlag.RPF_STRICT
    elif rpf >= 2:
        flags |= IfaceFlag.RPF_LOOSE
    for key, flag in (("accept_local", IfaceFlag.ACCEPT_LOCAL), ("route_localnet", IfaceFlag.ROUTE_LOCALNET)):
        if _sysctl(f"ipv4/conf/all/{key}") or _sysctl(f"{v4}/{key}"):
            flags |= flag
    if not has_addr4:
        flags |= IfaceFlag.NO_ADDR4
    # With custom rules the kernel checks every source by a lookup through the
    # rules (fib_validate_source); the fast path follows that only with
    # rp_filter 0, where the check refuses no more than local sources.
    if source_unsure or (custom_rules and rpf):
        flags |= IfaceFlag.SOURCE_UNSURE
    return flags


def flags_text(flags: int) -> str:
    """The mirrored policy in sysctl terms, for status."""
    f = IfaceFlag(flags)
    parts = [f"forwarding4={'off' if f & IfaceFlag.NO_FWD4 else 'on'}",
             f"forwarding6={'off' if f & IfaceFlag.NO_FWD6 else 'on'}",
             f"rp_filter={1 if f & IfaceFlag.RPF_STRICT else 2 if f & IfaceFlag.RPF_LOOSE else 0}"]
    parts += [n.lower() for n, b in (("ACCEPT_LOCAL", IfaceFlag.ACCEPT_LOCAL),
                                     ("ROUTE_LOCALNET", IfaceFlag.ROUTE_LOCALNET),
                                     ("NO_ADDR4", IfaceFlag.NO_ADDR4),
                                     ("SOURCE_UNSURE", IfaceFlag.SOURCE_UNSURE)) if f & b]
    return " ".join(parts)


class Interfaces:
    def __init__(self, dp: Datapath):
        self.dp = dp

    def configured(self) -> dict[int, lo.Iface]:
        return {k.value: v for k, v in self.dp.ifaces.lookup_batch()}

    def configure(self, ifindex: int, mac: bytes, mtu: int, flags: int | None = None, group: int = 0) -> int:
        """Add or refresh one interface; returns its counter slot. Without
        `flags`, an interface keeps its policy flags, and a new one gets its
        sysctls' (the agent keeps them current: set_flags)."""
        current = self.configured()
        if flags is None:
            flags = current[ifindex].flags if ifindex in current else policy_flags(ifname(ifindex))
        if ifindex in current:
            slot = current[ifindex].slot
            flags = (flags & ~OWNED_FLAGS) | (current[ifindex].flags & OWNED_FLAGS)
        else:
            used = {v.slot for v in current.values()}
            free = [s for s in range(1, lo.MAX_IFACES) if s not in used]
            if not free:
                raise InterfaceError(f"at most {lo.MAX_IFACES - 1} interfaces per router")
            slot = free[0]
        # devmap first: once `ifaces` lists it, the program may redirect to it.
        self.dp.tx_ports.update(lo.u32(ifindex), lo.u32(ifindex))
        self.dp.ifaces.update(lo.u32(ifindex), lo.Iface(slot=slot, mtu=mtu, mac=(lo.u8 * 6)(*mac), flags=flags,
                                                        group=group))
        return slot

    def set_flags(self, ifindex: int, flags: int) -> bool:
        """Write one configured interface's sysctl flags; True if they changed."""
        cur = self.dp.ifaces.lookup(lo.u32(ifindex))
        if cur is None:
            return False
        flags = (flags & ~OWNED_FLAGS) | (cur.flags & OWNED_FLAGS)
        if cur.flags == flags:
            return False
        cur.flags = flags
        self.dp.ifaces.update(lo.u32(ifindex), cur)
        return True

    def set_rule_pass_flags(self, flags: dict[int, int]) -> list[int]:
        """Set the IFACE_F_PASS_POLICY* and IFACE_F_RULES* bits of configured ports; returns those changed."""
        changed = []
        for ifindex, v in self.configured().items():
            want = (v.flags & ~RULE_PASS_FLAGS) | (flags.get(ifindex, 0) & RULE_PASS_FLAGS)
            if want != v.flags:
                v.flags = want
                self.dp.ifaces.update(lo.u32(ifindex), v)
                changed.append(ifindex)
        return changed

    def set_lb_flags(self, bits: int) -> None:
        """Set the IFACE_F_LB* bits of every configured port to `bits`."""
        for ifindex, v in self.configured().items():
            want = (v.flags & ~LB_FLAGS) | (bits & LB_FLAGS)
            if want != v.flags:
                v.flags = want
                self.dp.ifaces.update(lo.u32(ifindex), v)

    def remove(self, ifindex: int) -> None:
        self.dp.ifaces.delete(lo.u32(ifindex))
        self.dp.tx_ports.delete(lo.u32(ifindex))


def ifname(ifindex: int) -> str:
    """The interface's name in the current namespace, or if<N> when it has none."""
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"if{ifindex}"
