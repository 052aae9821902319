"""Routes and next hops: the kernel's routing table and its image in the BPF FIB.

The kernel FIB is the one RIB. Routes from `ip route`, routing daemons (BIRD,
FRR) and bpfrouter itself (`bpfrouter route add`, installed with protocol
`bpfrouter`) all live there, so the fast path and the kernel's slow path,
which handles every packet XDP passes up, always agree. This module mirrors
the best route per prefix into the BPF FIB:
  1. a route of the kernel's local table (the router's own addresses)
  2. else the main table's route with the lowest metric

Updates are make-before-break: a new next hop is written before the route
that uses it, and an old next hop is cleared only after no route points at
it, so a packet always sees a complete old or new entry. A restarted agent
reads the installed routes and next-hop ids back from the pinned maps and
then applies only the differences with a fresh kernel dump."""
from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass

from .datapath import Datapath
from .datapath import layout as lo
from .dirfib import DirTable
from .routespec import IPAddress, IPNetwork

RouteType = lo.RouteType
TABLE_MAIN, TABLE_LOCAL = 254, 255


PrefixKey = tuple[int, int, int]  # (IP version, address as int, length): cheap to hash


def prefix_key(prefix: IPNetwork) -> PrefixKey:
    return (prefix.version, int(prefix.network_address), prefix.prefixlen)


def key_network(k: PrefixKey) -> IPNetwork:
    return (ipaddress.IPv4Network if k[0] == 4 else ipaddress.IPv6Network)((k[1], k[2]))


@dataclass(frozen=True)
class Nexthop:
    ifindex: int
    gateway: IPAddress | None = None

    def __post_init__(self):
        # ipaddress objects do not cache their hash; this one is hashed per route
        object.__setattr__(self, "_hash", hash((self.ifindex, int(self.gateway) if self.gateway is not None else -1)))

    def __hash__(self) -> int:
        return self._hash


def _installed_type(rtype: RouteType, nexthops: tuple) -> RouteType:
    """What the data plane stores: ECMP routes are MULTIPATH until ECMP lands."""
    return RouteType.MULTIPATH if rtype == RouteType.UNICAST and len(nexthops) > 1 else rtype


def _route_key(pkey: PrefixKey, table: int, metric: int, nexthops: tuple) -> tuple[int, int, int]:
    """What tells kernel routes of one prefix apart (Route.key): table and metric, plus
    the device for IPv6, where one prefix (fe80::/64) exists per interface."""
    return (table, metric, nexthops[0].ifindex if pkey[0] == 6 and len(nexthops) == 1 else 0)


@dataclass(frozen=True)
class Route:
    prefix: IPNetwork
    type: RouteType
    nexthops: tuple[Nexthop, ...] = ()
    proto: int = lo.RTPROT_BPFROUTER
    metric: int = 0
    table: int = TABLE_MAIN

    def __post_init__(self):
        object.__setattr__(self, "pkey", prefix_key(self.prefix))
        object.__setattr__(self, "installed_type", _installed_type(self.type, self.nexthops))
        object.__setattr__(self, "key", _route_key(self.pkey, self.table, self.metric, self.nexthops))

    @classmethod
    def from_key(cls, pkey: PrefixKey, type: RouteType, nexthops: tuple[Nexthop, ...], proto: int,
                 metric: int, table: int) -> "Route":
        """Fast constructor for the netlink hot path: `prefix` is built only when read."""
        r = object.__new__(cls)
        r.__dict__.update(pkey=pkey, type=type, nexthops=nexthops, proto=proto, metric=metric, table=table,
                          installed_type=_installed_type(type, nexthops),
                          key=_route_key(pkey, table, metric, nexthops))
        return r

    def __getattr__(self, name: str):
        if name == "prefix":  # only routes made by from_key lack it
            prefix = key_network(self.__dict__["pkey"])
            self.__dict__["prefix"] = prefix
            return prefix
        raise AttributeError(name)

    def same_forwarding(self, other: "Route | None") -> bool:
        return other is not None and (self.installed_type, self.nexthops, self.proto) == \
            (other.installed_type, other.nexthops, other.proto)

    def word(self, nh_id: int) -> int:
        """struct route as its 64-bit little-endian word (see dirfib.route_word)."""
        return nh_id | int(self.installed_type) << 32 | self.pkey[2] << 40 | self.proto << 48


class FibError(Exception):
    pass


def _fib_key(prefix: IPNetwork):
    if prefix.version == 4:
        return lo.Route4Key(prefix.prefixlen, (lo.u8 * 4)(*prefix.network_address.packed))
    return lo.Route6Key(prefix.prefixlen, (lo.u8 * 16)(*prefix.network_address.packed))


def _key_prefix(key) -> IPNetwork:
    raw = bytes(key.addr)
    addr = ipaddress.ip_address(raw)
    return ipaddress.ip_network(f"{addr}/{key.prefixlen}")


def _nh_value(nh: Nexthop) -> lo.NexthopValue:
    v = lo.NexthopValue(ifindex=nh.ifindex)
    if nh.gateway is not None:
        v.flags = lo.NEXTHOP_F_GATEWAY
        v.family = lo.AF_INET if nh.gateway.version == 4 else lo.AF_INET6
        packed = nh.gateway.packed
        v.gw = (lo.u8 * 16)(*packed.ljust(16, b"\0"))
    return v


def _nh_from_value(v: lo.NexthopValue) -> Nexthop:
    gw = None
    if v.flags & lo.NEXTHOP_F_GATEWAY:
        raw = bytes(v.gw)
        gw = ipaddress.ip_address(raw[:4] if v.family == lo.AF_INET else raw)
    return Nexthop(v.ifindex, gw)


class NexthopTable:
    """Reference-counted next-hop ids in the `nexthops` array map (id 0 unused).

    Freed ids go to the back of a FIFO, so an id is reused as late as possible."""

    def __init__(self, dp: Datapath):
        self.dp = dp
        self.ids: dict[Nexthop, int] = {}
        self.by_id: dict[int, Nexthop] = {}
        self.refs: dict[int, int] = {}
        self.free: deque[int] = deque()
        self.next_id = 1

    def acquire(self, nh: Nexthop) -> int:
        nid = self.ids.get(nh)
        if nid is None:
            if self.free:
                nid = self.free.popleft()
            elif self.next_id < self.dp.nexthops.max_entries:
                nid = self.next_id
                self.next_id += 1
            else:
                raise FibError(f"next-hop table full ({self.dp.nexthops.max_entries} entries)")
            self.dp.nexthops.update(lo.u32(nid), _nh_value(nh))
            self.ids[nh], self.by_id[nid], self.refs[nid] = nid, nh, 0
        self.refs[nid] += 1
        return nid

    def release(self, nid: int) -> None:
        if nid not in self.refs:
            return
        self.refs[nid] -= 1
        if self.refs[nid] <= 0:
            nh = self.by_id.pop(nid)
            del self.ids[nh], self.refs[nid]
            self.dp.nexthops.update(lo.u32(nid), lo.NexthopValue())
            self.free.append(nid)

    def recover(self) -> None:
        """Rebuild ids from the pinned map (refcounts are rebuilt by Fib.recover)."""
        for k, v in self.dp.nexthops.lookup_batch():
            if v.ifindex:
                nh = _nh_from_value(v)
                self.ids[nh], self.by_id[k.value], self.refs[k.value] = k.value, nh, 0
        self.next_id = max(self.by_id, default=0) + 1
        self.free = deque(i for i in range(1, self.next_id) if i not in self.by_id)

    def collect_unused(self) -> None:
        for nid in [i for i, r in self.refs.items() if r <= 0]:
            self.refs[nid] = 1
            self.release(nid)


class Installed:
    """What the BPF FIB holds for a prefix: the route and its next-hop id."""
    __slots__ = ("route", "nh_id")

    def __init__(self, route: Route, nh_id: int = 0):
        self.route, self.nh_id = route, nh_id


class LpmTable:
    """One family's BPF_MAP_TYPE_LPM_TRIE (`--fib-impl lpm`)."""

    def __init__(self, m):
        self.map = m

    def set(self, prefix: IPNetwork, value: lo.RouteValue) -> None:
        self.map.update(_fib_key(prefix), value)

    def set_key(self, addr: int, length: int, word: int, version: int) -> None:
        self.map.update(_fib_key(key_network((version, addr, length))),
                        lo.RouteValue.from_buffer_copy(word.to_bytes(8, "little")))

    def set_many(self, entries: list[tuple[int, int, int]], version: int) -> None:
        """entries: (address as int, length, route word)."""
        pairs = []
        for addr, length, word in entries:
            pairs.append((_fib_key(key_network((version, addr, length))),
                          lo.RouteValue.from_buffer_copy(word.to_bytes(8, "little"))))
        self.map.update_batch(pairs)

    def delete(self, pk: PrefixKey) -> bool:
        return self.map.delete(_fib_key(key_network(pk)))

    def installed(self) -> list[tuple[IPNetwork, lo.RouteValue]]:
        return [(_key_prefix(k), v) for k, v in self.map.lookup_batch()]

    def count(self) -> int:
        return self.map.count()

    def memory(self) -> dict[str, int]:
        """LPM trie nodes are allocated per route; the kernel reports them in fdinfo."""
        return {"impl": "lpm", "bytes": map_memlock(self.map.fd), "routes": self.count(),
                "routes_total": self.map.max_entries}

    def close(self) -> None:
        pass


def fib_memory(dp) -> dict[int, dict]:
    """Each FIB table's memory() by IP version, read from the pinned maps."""
    tables = make_tables(dp, recover=False)
    try:
        return {v: t.memory() for v, t in tables.items()}
    finally:
        for t in tables.values():
            t.close()


def map_memlock(fd: int) -> int:
    """Memory the kernel charges to a map (memlock in /proc/self/fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return 0


def make_tables(dp: Datapath, recover: bool = True) -> dict[int, "DirTable | LpmTable"]:
    """The FIB structure the router was loaded with (the loader shrinks the unused one)."""
    m = dp.maps
    if m["dir4_root"].max_entries > 1:
        return {v: DirTable(m[f"dir{v}_root"], m[f"dir{v}_groups"], m[f"dir{v}_leaves"], m[f"dir{v}_root_leaf"],
                            m[f"dir{v}_group_leaf"], 32 if v == 4 else 128, recover) for v in (4, 6)}
    return {4: LpmTable(dp.fib4), 6: LpmTable(dp.fib6)}


class Fib:
    """The kernel's routes by prefix, and the best of each written to the BPF FIB.
    Indexed by PrefixKey: at a million routes, hashing ipaddress objects costs seconds."""

    def __init__(self, dp: Datapath):
        self.dp = dp
        self.tables = make_tables(dp)
        self.nexthops = NexthopTable(dp)
        self.kernel: dict[PrefixKey, dict[tuple[int, int, int], Route]] = {}
        self.installed: dict[PrefixKey, Installed] = {}
        self.counts = {4: 0, 6: 0}  # installed prefixes per family, kept as they change

    # --- selection --------------------------------------------------------
    def best(self, pk: PrefixKey) -> Route | None:
        routes = self.kernel.get(pk)
        if not routes:
            return None
        if len(routes) == 1:
            return next(iter(routes.values()))
        return min(routes.values(), key=lambda r: (r.table != TABLE_LOCAL, r.metric, r.key))

    def _sync(self, pk: PrefixKey) -> None:
        want = self.best(pk)
        have = self.installed.get(pk)
        if want is None:
            if have is not None:
                self._delete(pk, have)
            return
        if have is not None and want.same_forwarding(have.route):
            have.route = want
            return
        self._write_many([(want, have)])

    def _delete(self, pk: PrefixKey, old: Installed) -> None:
        self.tables[pk[0]].delete(pk)
        del self.installed[pk]
        self.counts[pk[0]] -= 1
        if old.nh_id:
            self.nexthops.release(old.nh_id)

    def _write_many(self, writes: list[tuple[Route, "Installed | None"]]) -> None:
        """Write routes (new, or replacing `old`) with one table write per family.
        Make-before-break: next hops first, old ones released after."""
        batches: dict[int, list] = {4: [], 6: []}
        installed = self.installed
        acquire = self.nexthops.acquire
        ids: list[int] = []  # next-hop id of each write, 0 for none
        last_nh, last_id = None, 0
        for route, _ in writes:
            nh_id = 0
            if route.installed_type == RouteType.UNICAST:
                nh = route.nexthops[0]
                if nh is last_nh:  # the decoder interns next hops: skip hashing
                    nh_id = last_id
                    self.nexthops.refs[nh_id] += 1
                else:
                    nh_id = last_id = acquire(nh)
                    last_nh = nh
            ids.append(nh_id)
            pk = route.pkey
            batches[pk[0]].append((pk[1], pk[2], route.word(nh_id)))
        try:
            for version, entries in batches.items():
                if entries:
                    self.tables[version].set_many(entries, version)
        except Exception:  # e.g. table full: the RIB view stays as it was
            for nh_id in ids:
                if nh_id:
                    self.nexthops.release(nh_id)
            raise
        for (route, old), nh_id in zip(writes, ids, strict=True):
            installed[route.pkey] = Installed(route, nh_id)
            if old is None:
                self.counts[route.pkey[0]] += 1
            elif old.nh_id:
                self.nexthops.release(old.nh_id)

    def close(self) -> None:
        for t in self.tables.values():
            t.close()

    # --- kernel routes -------------------------------------------------------
    def update(self, route: Route, replace: bool = False) -> None:
        """A kernel route appeared. With replace (NLM_F_REPLACE), it takes the place
        of the routes with the same table and metric, as the kernel does; for IPv6
        those may be on other devices and no deletion is announced for them."""
        routes = self.kernel.setdefault(route.pkey, {})
        if replace:
            for key in [k for k in routes if k[:2] == route.key[:2]]:
                del routes[key]
        routes[route.key] = route
        self._sync(route.pkey)

    def delete(self, route: Route) -> None:
        pk = route.pkey
        routes = self.kernel.get(pk)
        if not routes or routes.pop(route.key, None) is None:
            return
        if not routes:
            del self.kernel[pk]
        self._sync(pk)

    def apply_batch(self, events) -> int:
        """Apply route notifications, (new, replace, route) tuples, in one go:
        the RIB first, then one vectorized FIB write. Returns prefixes touched."""
        touched: set[PrefixKey] = set()
        kernel = self.kernel
        for new, replace, r in events:
            if r is None:
                continue
            pk = r.pkey
            if new:
                routes = kernel.setdefault(pk, {})
                if replace:
                    for key in [k for k in routes if k[:2] == r.key[:2]]:
                        del routes[key]
                routes[r.key] = r
            else:
                routes = kernel.get(pk)
                if not routes or routes.pop(r.key, None) is None:
                    continue
                if not routes:
                    del kernel[pk]
            touched.add(pk)
        self._reconcile(touched)
        return len(touched)

    def _reconcile(self, touched) -> int:
        """Make the BPF FIB hold the best route of each touched prefix, with one
        vectorized write; returns the number of prefixes changed."""
        writes = []
        deleted = 0
        installed = self.installed
        for pk in touched:
            routes = self.kernel.get(pk)
            want = (next(iter(routes.values())) if len(routes) == 1 else self.best(pk)) if routes else None
            have = installed.get(pk)
            if want is None:
                if have is not None:
                    self._delete(pk, have)
                    deleted += 1
            elif have is not None and want.same_forwarding(have.route):
                have.route = want
            else:
                writes.append((want, have))
        self._write_many(writes)
        return len(writes) + deleted

    def replace_all(self, routes: list[Route]) -> int:
        """Full resync with a fresh kernel dump; returns the number of prefixes changed."""
        fresh: dict[PrefixKey, dict[tuple[int, int, int], Route]] = {}
        for r in routes:
            fresh.setdefault(r.pkey, {})[r.key] = r
        touched = set(self.kernel) | set(fresh) | set(self.installed) if self.installed else fresh.keys()
        self.kernel = fresh
        changed = self._reconcile(touched)
        self.nexthops.collect_unused()
        return changed

    # --- restart --------------------------------------------------------------
    def recover(self) -> None:
        """Read what the pinned maps hold, so a resync rewrites only differences."""
        self.nexthops.recover()
        for table in self.tables.values():
            for prefix, v in table.installed():
                nhs: tuple[Nexthop, ...] = ()
                if v.type == RouteType.UNICAST and v.nh_id in self.nexthops.by_id:
                    nhs = (self.nexthops.by_id[v.nh_id],)
                    self.nexthops.refs[v.nh_id] += 1
                route = Route(prefix, RouteType(v.type), nhs, v.proto)
                self.installed[route.pkey] = Installed(route, v.nh_id if nhs else 0)
                self.counts[route.pkey[0]] += 1

    # --- views ------------------------------------------------------------------
    def routes(self, prefix: IPNetwork | None = None) -> list[Route]:
        keys = [prefix_key(prefix)] if prefix is not None else sorted(self.kernel)
        return [r for k in keys for r in sorted(self.kernel.get(k, {}).values(), key=lambda r: r.key)]

    def installed_route(self, prefix: IPNetwork) -> Route | None:
        inst = self.installed.get(prefix_key(prefix))
        return inst.route if inst else None

    def sizes(self) -> dict[str, int]:
        return {"ipv4": self.counts[4], "ipv6": self.counts[6], "nexthops": len(self.nexthops.by_id)}


def _sort_key(p: IPNetwork):
    return (p.version, p.network_address.packed, p.prefixlen)


def read_installed(dp: Datapath) -> list[tuple[IPNetwork, lo.RouteValue, Nexthop | None]]:
    """The BPF FIB as the data plane sees it (for `route show` without the agent)."""
    nhs = {k.value: _nh_from_value(v) for k, v in dp.nexthops.lookup_batch() if v.ifindex}
    out = []
    tables = make_tables(dp, recover=False)
    try:
        for table in tables.values():
            out.extend((prefix, v, nhs.get(v.nh_id)) for prefix, v in table.installed())
    finally:
        for t in tables.values():
            t.close()
    out.sort(key=lambda t: _sort_key(t[0]))
    return out
