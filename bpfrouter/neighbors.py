"""The neighbor map: kernel neighbor entries (IP -> MAC per interface).

Liveness. The kernel decides whether a neighbor is still there only when its
own traffic uses the entry (neigh_event_send): a STALE entry goes to DELAY,
then PROBE (unicast solicitations), then REACHABLE or FAILED; a REACHABLE
entry used within delay_first_probe_time of its expiry goes to DELAY rather
than STALE. Packets forwarded by XDP never reach that code, so without help a
dead or replaced next hop would keep its STALE entry, and the fast path its
traffic, for ever. The fast path therefore marks each entry it forwards with
(bpf/include/neigh.h, once per pass), and `poke_used` replays that use to the
kernel every POKE_SECONDS with RTM_NEWNEIGH + NTF_USE, which runs exactly
neigh_event_send: the kernel then ages, probes and fails the entry as it
would with its own traffic, at most POKE_SECONDS later (static and managed
entries are left alone: see `poke`). FAILED and INCOMPLETE
entries leave the map on the RTM_NEWNEIGH that follows (`set`), and the
packets go to the kernel (reason no_neigh), which resolves the next hop again,
a new MAC included.

Chosen over kernel-managed entries (NTF_EXT_MANAGED): those are probed
whether traffic uses them or not, would turn every next hop's entry into a
managed one the agent must create and delete (visible in `ip neigh`), and
still follow a schedule of their own rather than the traffic's. NTF_USE
changes no entry the kernel would not change itself with the same traffic."""
from __future__ import annotations

import errno
import ipaddress

from pyroute2.netlink.exceptions import NetlinkError

from .bpf import BpfError
from .datapath import Datapath
from .datapath import layout as lo
from .routespec import IPAddress

BPF_EXIST = 2
NTF_USE, NTF_EXT_LEARNED, NTF_ROUTER = 0x01, 0x10, 0x80
NTF_KEPT = NTF_EXT_LEARNED | NTF_ROUTER  # an entry's flags a poke must send back unchanged
NTF_EXT_MANAGED = 0x01  # in NDA_FLAGS_EXT
NUD_NEVER_AGED = 0x40 | 0x80  # NOARP, PERMANENT
# How often the fast path's use is replayed to the kernel: at most the default
# delay_first_probe_time (5 s), so a used REACHABLE entry goes to DELAY at
# expiry as it would with kernel traffic.
POKE_SECONDS = 1.0

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
            self.dp.neighbors.update(key, lo.Neigh((lo.u8 * 6)(*mac), state, 0))
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

    def take_used(self) -> list[lo.NeighKey]:
        """Entries the fast path used since the last call; their marks are
        cleared (an entry the agent removes meanwhile is not recreated)."""
        used = []
        for k, v in self.dp.neighbors.lookup_batch():
            if v.used:
                v.used = 0
                try:
                    self.dp.neighbors.update(k, v, BPF_EXIST)
                except BpfError:
                    continue  # gone meanwhile
                used.append(k)
        return used

    @staticmethod
    def poke(ipr, keys: list[lo.NeighKey]) -> int:
        """Tell the kernel these entries were used (NTF_USE: neigh_event_send);
        returns how many it was told about. Never creates an entry.

        NTF_USE goes through the kernel's admin update path, which would also
        apply the request's flags and strip PERMANENT: so each entry is read
        first, its own flags (extern_learn, router) are sent back unchanged,
        and entries the kernel never ages are left alone: PERMANENT, NOARP
        and kernel-managed ones (NTF_EXT_MANAGED, kept fresh by the kernel)."""
        n = 0
        for k in keys:
            dst, fam = str(key_addr(k)), k.family
            try:
                cur = ipr.neigh("get", dst=dst, ifindex=k.ifindex, family=fam)[0]
                if cur["state"] & NUD_NEVER_AGED or (cur.get_attr("NDA_FLAGS_EXT") or 0) & NTF_EXT_MANAGED:
                    continue
                ipr.neigh("change", dst=dst, ifindex=k.ifindex, family=fam,
                          flags=NTF_USE | (cur["flags"] & NTF_KEPT))
                n += 1
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV):
                    raise
        return n
