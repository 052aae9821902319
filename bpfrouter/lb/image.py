"""Services written into the lb stage's maps (bpf/include/lb.h).

Each service has an id (its entry in lb_services, its counters) and one
backend slot per backend (lb_backends: address, whether it takes
connections, and a generation the connection table's entries carry, so a
slot given to another backend never inherits connections). Its Maglev
table is a range of lb_ring. A changed table goes into a fresh range,
then the service's entry names it with one update; the old range is
reused only after an RCU grace period, when no packet still reads it.

Everything here is read back from the pinned maps when the agent starts:
ids, slots, generations and ranges stay as they were, so an agent restart
moves no flow."""
from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass, field

import numpy as np

from ..datapath import layout as lo
from ..grace import GRACE
from . import maglev
from .service import GUE_PORT, PROTOS, Service, ServiceId

u32 = lo.u32
DEFAULT_SRC4 = ipaddress.ip_network("172.16.0.0/16")   # Katran's IPIP source range
DEFAULT_SRC6 = ipaddress.ip_network("100::/96")         # RFC 6666's discard-only prefix


class LbError(Exception):
    pass


def service_flags(svc: Service) -> int:
    return (0 if svc.affinity else lo.LB_SVC_F_NO_AFFINITY) | (lo.LB_SVC_F_NAT if svc.mode == "nat" else 0) | \
        (lo.LB_SVC_F_GUE if svc.encap == "gue" else 0)


def service_key(sid: ServiceId) -> lo.LbServiceKey:
    a = sid.addr
    k = lo.LbServiceKey(port=int.from_bytes(sid.port.to_bytes(2, "big"), "little"), proto=PROTOS[sid.proto],
                        family=a.version)
    ctypes.memmove(k.addr, a.packed, len(a.packed))
    return k


def vip_key(addr) -> lo.LbVipKey:
    k = lo.LbVipKey(family=addr.version)
    ctypes.memmove(k.addr, addr.packed, len(addr.packed))
    return k


@dataclass
class Placed:
    """A service's place in the maps."""
    id: int
    ring_base: int = 0
    ring_size: int = 0
    slots: dict[str, int] = field(default_factory=dict)   # backend address -> slot
    table: list[str | None] = field(default_factory=list)  # per ring entry: the backend's address
    moved: float | None = None      # share of flows the last table change moved
    nat_sources: set[str] = field(default_factory=set)    # NAT: the router's addresses toward the backends


class LbImage:
    def __init__(self, dp):
        m = dp.maps
        self.services, self.vips, self.backends = m["lb_services"], m["lb_vips"], m["lb_backends"]
        self.ring, self.config = m["lb_ring"], m["lb_config"]
        self.service_counters, self.backend_counters = m["lb_service_stats"], m["lb_backend_stats"]
        self.placed: dict[ServiceId, Placed] = {}
        self.nat: set[ServiceId] = set()        # services in NAT mode
        self.gens: dict[int, int] = {}          # slot -> its generation
        self.free_ranges: list[tuple[int, int]] = [(0, lo.MAX_LB_RING)]
        self.retired: list[tuple[int, tuple[int, int]]] = []  # (grace tag, range)
        self._recover()

    # --- reading back what an earlier agent wrote ---------------------------------------------
    def _recover(self) -> None:
        stride = (ctypes.sizeof(lo.LbBackend) + 7) & ~7
        mm = self.backends.mmap()
        try:
            gens = np.frombuffer(mm, np.uint32)[:lo.MAX_LB_BACKENDS * stride // 4] \
                .reshape(lo.MAX_LB_BACKENDS, stride // 4)[:, lo.LbBackend.gen.offset // 4].copy()
        finally:
            mm.close()
        self.gens = {int(i): int(gens[i]) for i in np.flatnonzero(gens)}
        for k, v in self.services.lookup_batch():
            a = ipaddress.ip_address(bytes(k.addr[:4 if k.family == 4 else 16]))
            proto = next(p for p, n in PROTOS.items() if n == k.proto)
            port = int.from_bytes(int(k.port).to_bytes(2, "little"), "big")
            sid = ServiceId(proto, str(a), port)
            p = Placed(v.id, v.ring_base, v.ring_size)
            if v.flags & lo.LB_SVC_F_NAT:
                self.nat.add(sid)
            for slot, gen in self.gens.items():
                be = self.backends.lookup(u32(slot))
                if be.service == v.id and be.gen == gen:
                    addr = ipaddress.ip_address(bytes(be.addr[:4 if be.family == 4 else 16]))
                    p.slots[str(addr)] = slot
                    if v.flags & lo.LB_SVC_F_NAT and any(be.nat_src):
                        p.nat_sources.add(str(ipaddress.ip_address(bytes(be.nat_src[:4 if be.family == 4 else 16]))))
            by_slot = {s: a for a, s in p.slots.items()}
            if v.ring_size:
                entries = [self.ring.lookup(u32(v.ring_base + i)).value for i in range(v.ring_size)]
                p.table = [by_slot.get(e) for e in entries]
                self._take_range(v.ring_base, v.ring_size)
            self.placed[sid] = p

    # --- rings ----------------------------------------------------------------------------------
    def _take_range(self, base: int, size: int) -> None:
        for i, (b, n) in enumerate(self.free_ranges):
            if b <= base and base + size <= b + n:
                rest = [(b, base - b), (base + size, b + n - base - size)]
                self.free_ranges[i:i + 1] = [r for r in rest if r[1]]
                return
        raise LbError(f"ring range {base}+{size} is not free")

    def _alloc_range(self, size: int) -> int:
        self._reclaim()
        for b, n in self.free_ranges:
            if n >= size:
                self._take_range(b, size)
                return b
        if self.retired:
            GRACE.wait(self.retired[-1][0])
            self._reclaim()
            return self._alloc_range(size)
        raise LbError(f"no room for a table of {size} slots: the services' tables fill lb_ring "
                      f"({lo.MAX_LB_RING} slots)")

    def _free_range(self, base: int, size: int) -> None:
        if size:
            self.retired.append((GRACE.mark(), (base, size)))

    def _reclaim(self) -> None:
        keep = []
        for tag, r in self.retired:
            if GRACE.passed(tag):
                self.free_ranges.append(r)
            else:
                keep.append((tag, r))
        self.retired = keep
        merged: list[tuple[int, int]] = []
        for b, n in sorted(self.free_ranges):
            if merged and merged[-1][0] + merged[-1][1] == b:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((b, n))
        self.free_ranges = merged

    # --- ids and slots -------------------------------------------------------------------------
    def _new_id(self) -> int:
        used = {p.id for p in self.placed.values()}
        for i in range(1, lo.MAX_LB_SERVICES):
            if i not in used:
                self.service_counters.zero(u32(i))
                return i
        raise LbError(f"at most {lo.MAX_LB_SERVICES - 1} services")

    def _new_slot(self) -> int:
        used = {s for p in self.placed.values() for s in p.slots.values()}
        for s in range(1, lo.MAX_LB_BACKENDS):
            if s not in used:
                self.gens[s] = self.gens.get(s, 0) + 1
                self.backend_counters.zero(u32(s))
                return s
        raise LbError(f"at most {lo.MAX_LB_BACKENDS - 1} backends over all services")

    # --- writing a service --------------------------------------------------------------------
    def apply(self, svc: Service, healthy: dict[str, bool], nat_sources: dict[str, str] | None = None) -> Placed:
        """Write a service as it is now: its backends (healthy ones take
        new flows at their weight, drained ones keep their connections) and
        its table, when that changed. nat_sources: for a NAT service, the
        router's address toward each backend."""
        p = self.placed.get(svc.id)
        if p is None:
            p = self.placed[svc.id] = Placed(self._new_id())
        for addr in svc.backends:
            if addr not in p.slots:
                p.slots[addr] = self._new_slot()
        gone = [a for a in p.slots if a not in svc.backends]
        addrs = sorted(svc.backends, key=lambda a: ipaddress.ip_address(a).packed)
        members = [maglev.Member(a, svc.backends[a].weight if healthy.get(a, True) else 0) for a in addrs]
        size = svc.table_size or maglev.table_size(len(addrs), p.ring_size or None)
        live = any(m.weight for m in members)
        table = [addrs[i] if i >= 0 else None for i in maglev.build(members, size)] if live else []
        # backends first: a new table may name them
        for a in addrs:
            self._write_backend(p, a, healthy.get(a, True), (nat_sources or {}).get(a))
        if table != p.table:
            old = p.table
            base = self._alloc_range(size) if table else 0
            if table:
                slots = [p.slots[a] for a in table]
                self.ring.update_batch(list(zip((u32(base + i) for i in range(size)), (u32(s) for s in slots))))
            self.services.update(service_key(svc.id), lo.LbService(
                id=p.id, ring_base=base, ring_size=size if table else 0, flags=service_flags(svc)))
            self._free_range(p.ring_base, p.ring_size)
            p.moved = maglev.moved(old, table) if old and table else None
            p.ring_base, p.ring_size, p.table = base, size if table else 0, table
        else:
            self.services.update(service_key(svc.id), lo.LbService(
                id=p.id, ring_base=p.ring_base, ring_size=p.ring_size, flags=service_flags(svc)))
        for a in gone:     # after the table no longer names them
            self._free_slot(p.slots.pop(a))
        p.nat_sources = {(nat_sources or {})[a] for a in svc.backends if (nat_sources or {}).get(a)} \
            if svc.mode == "nat" else set()
        self._write_vips()
        self._set_nat(svc.id, svc.mode == "nat")
        return p

    def _write_backend(self, p: Placed, addr: str, healthy: bool, nat_src: str | None) -> None:
        a = ipaddress.ip_address(addr)
        slot = p.slots[addr]
        be = lo.LbBackend(family=a.version, flags=lo.LB_BE_F_CONNS if healthy else 0, service=p.id,
                          gen=self.gens[slot])
        ctypes.memmove(be.addr, a.packed, len(a.packed))
        if nat_src:
            src = ipaddress.ip_address(nat_src).packed
            ctypes.memmove(be.nat_src, src, len(src))
        self.backends.update(u32(slot), be)

    def _set_nat(self, sid: ServiceId, on: bool) -> None:
        """Replies are looked up while any service is in NAT mode."""
        before = len(self.nat)
        (self.nat.add if on else self.nat.discard)(sid)
        if len(self.nat) != before:
            c = self.config.lookup(u32(0))
            c.nat_services = len(self.nat)
            self.config.update(u32(0), c)

    def _free_slot(self, slot: int) -> None:
        """No service's any more; its generation stays, for the next owner's."""
        self.backends.update(u32(slot), lo.LbBackend(gen=self.gens[slot]))

    def remove(self, sid: ServiceId) -> None:
        p = self.placed.pop(sid, None)
        if p is None:
            return
        self.services.delete(service_key(sid))
        self._free_range(p.ring_base, p.ring_size)
        for slot in p.slots.values():
            self._free_slot(slot)
        self._write_vips()
        self._set_nat(sid, False)

    def _write_vips(self) -> None:
        """The addresses the lb stage must see (lb_vips): VIPs, NAT sources."""
        want: dict[tuple, int] = {}
        for sid, p in self.placed.items():
            for a, kind in ((sid.addr, lo.LB_ADDR_VIP), *((ipaddress.ip_address(s), lo.LB_ADDR_NAT_SOURCE)
                                                          for s in p.nat_sources)):
                k = (a.version, a.packed)
                want[k] = want.get(k, 0) | kind
        have = {(k.family, bytes(k.addr[:4 if k.family == 4 else 16])): v.value for k, v in self.vips.lookup_batch()}
        for fam, packed in set(have) - set(want):
            self.vips.delete(vip_key(ipaddress.ip_address(packed)))
        for (fam, packed), kind in want.items():
            if have.get((fam, packed)) != kind:
                self.vips.update(vip_key(ipaddress.ip_address(packed)), u32(kind))

    def takes_connections(self, sid: ServiceId, addr: str) -> bool:
        """Whether the backend's entry takes connections (healthy, or draining)."""
        p = self.placed.get(sid)
        if p is None or addr not in p.slots:
            return True
        return bool(self.backends.lookup(u32(p.slots[addr])).flags & lo.LB_BE_F_CONNS)

    def families(self) -> int:
        """The IFACE_F_LB* bits: families with a service."""
        bits = 0
        for sid in self.placed:
            bits |= lo.IFACE_F_LB4 if sid.addr.version == 4 else lo.IFACE_F_LB6
        return bits

    # --- settings and counters ----------------------------------------------------------------
    def set_config(self, src4, src6, new_conn_limit: int, gue_port: int = GUE_PORT) -> None:
        c = lo.LbConfig(new_conn_limit=new_conn_limit, nat_services=len(self.nat))
        ctypes.memmove(c.gue_port, gue_port.to_bytes(2, "big"), 2)
        ctypes.memmove(c.src4, src4.network_address.packed, 4)
        ctypes.memmove(c.src4_hostmask, src4.hostmask.packed, 4)
        ctypes.memmove(c.src6, src6.network_address.packed, 16)
        self.config.update(u32(0), c)

    def service_stats(self, sid: ServiceId) -> dict:
        p = self.placed[sid]
        per_cpu = self.service_counters.lookup(u32(p.id))
        return {f: sum(getattr(c, f) for c in per_cpu) for f, _ in lo.LbStat._fields_}

    def backend_stats(self, sid: ServiceId) -> dict[str, dict]:
        out = {}
        for addr, slot in self.placed[sid].slots.items():
            per_cpu = self.backend_counters.lookup(u32(slot))
            out[addr] = {"packets": sum(c.packets for c in per_cpu), "bytes": sum(c.bytes for c in per_cpu)}
        return out

    def loads(self, sid: ServiceId) -> dict[str, float]:
        """Each backend's share of the table (what a uniform flow mix sends it)."""
        t = self.placed[sid].table
        out: dict[str, float] = {}
        for a in t:
            if a is not None:
                out[a] = out.get(a, 0) + 1
        return {a: n / len(t) for a, n in out.items()} if t else {}
