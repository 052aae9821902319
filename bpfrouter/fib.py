"""Routes and next hops: the kernel's routing table and its image in the BPF FIB.

The kernel FIB is the one RIB. Routes from `ip route`, routing daemons (BIRD,
FRR) and bpfrouter itself (`bpfrouter route add`, installed with protocol
`bpfrouter`) all live there, so the fast path and the kernel's slow path,
which handles every packet XDP passes up, always agree. This module mirrors
the best route per prefix into the BPF FIB:
  1. a route of the kernel's local table (the router's own addresses)
  2. else the main table's route with the lowest metric
IPv6 looks its local table up before main as a whole, so an IPv6 main route
inside a local-table prefix (shorter than /128) is mirrored as local.

Updates are make-before-break: a new next hop is written before the route
that uses it, and an old next hop is cleared only after no route points at
it, so a packet always sees a complete old or new entry. A restarted agent
reads the installed routes and next-hop ids back from the pinned maps and
then applies only the differences with a fresh kernel dump.

A full FIB degrades, it does not fail: a route the tables have no room for
(leaves, groups, hash space, next-hop ids) is left out, and so is every
route that covers it (withheld), so no packet for it is forwarded by a
shorter route: the fast path finds no route there and passes the packet to
the kernel, which has them all. Routes longer than it and all other routes
are still forwarded. Each left-out prefix is retried whenever it changes,
and all of them at every full resync."""
from __future__ import annotations

import errno
import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass
from operator import attrgetter, itemgetter

import numpy as np

from .bpf import BpfError
from .datapath import Datapath
from .datapath import layout as lo
from .dirfib import CompressedRoot, DirFull, DirTable, FreeList
from .ecmp import GroupSpaceFull, GroupTable, NexthopGroup
from .grace import GRACE
from .nexthop import Nexthop, nexthop_of_value, nexthop_value
from .hashfib6 import HashTable6
from .routespec import IPNetwork

RouteType = lo.RouteType
TABLE_MAIN, TABLE_LOCAL = 254, 255
FALLBACK_CHUNK = 4096  # a batch that did not fit is retried in chunks of this many, then route by route

log = logging.getLogger("bpfrouter.fib")


PrefixKey = tuple[int, int, int]  # (IP version, address as int, length): cheap to hash


def prefix_key(prefix: IPNetwork) -> PrefixKey:
    return (prefix.version, int(prefix.network_address), prefix.prefixlen)


def key_network(k: PrefixKey) -> IPNetwork:
    return (ipaddress.IPv4Network if k[0] == 4 else ipaddress.IPv6Network)((k[1], k[2]))


def _installed_type(rtype: RouteType, nexthops: tuple, group) -> RouteType:
    """What the data plane stores: a route with a next-hop group is MULTIPATH."""
    # the group first: comparing IntEnums is slow, and this runs per route
    if group is not None or (len(nexthops) > 1 and rtype == RouteType.UNICAST):
        return RouteType.MULTIPATH
    return rtype


_ROUTE_KEYS: dict[tuple[int, int, int], tuple[int, int, int]] = {}


def _route_key(pkey: PrefixKey, table: int, metric: int, nexthops: tuple) -> tuple[int, int, int]:
    """What tells kernel routes of one prefix apart (Route.key): table and metric, plus
    the device for IPv6, where one prefix (fe80::/64) exists per interface. Interned:
    a full table has a handful of distinct keys, not one tuple per route."""
    key = (table, metric, nexthops[0].ifindex if pkey[0] == 6 and len(nexthops) == 1 else 0)
    if len(_ROUTE_KEYS) < 4096:  # bounded, whatever metrics a daemon uses
        return _ROUTE_KEYS.setdefault(key, key)
    return _ROUTE_KEYS.get(key, key)


# A RouteType.KERNEL route's entry holds, in place of a next-hop id, why the
# kernel must route it: the pass reason (the data plane reads only these 8
# bits), the kernel's route type (rtm_type) and the encapsulation type.
RTN_NAMES = {0: "unspec", 1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
             6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat", 11: "xresolve"}
ENCAP_NAMES = {1: "mpls", 2: "ip", 3: "ila", 4: "ip6", 5: "seg6", 6: "bpf", 7: "seg6local", 8: "rpl",
               9: "ioam6", 10: "xfrm"}


def kernel_route_bits(reason: lo.Reason, rtm_type: int = 1, encap: int = 0) -> int:
    return int(reason) | (rtm_type & 0xFF) << 8 | (encap & 0xFF) << 16


def kernel_route_info(bits: int) -> dict:
    """What a RouteType.KERNEL entry's bits say: {"reason", "kernel_type", "encap"}."""
    reason = bits & lo.KERNEL_ROUTE_REASON_MASK
    encap = bits >> 16 & 0xFF
    return {"reason": lo.Reason(reason).label if reason in lo.Reason._value2member_map_ else str(reason),
            "kernel_type": RTN_NAMES.get(bits >> 8 & 0xFF, str(bits >> 8 & 0xFF)),
            "encap": ENCAP_NAMES.get(encap, str(encap)) if encap else None}


def _word_bits(installed_type: RouteType, pkey: PrefixKey, proto: int) -> int:
    """The route's 64-bit little-endian word (struct route; see dirfib.route_word)
    without its next-hop id, which the writer ORs in."""
    return int(installed_type) << 32 | pkey[2] << 40 | proto << 48


class Route:
    """A kernel route (treat as immutable). Slots, not a dict per object: a
    full table is a million of these, about 250 bytes each with the decoder's
    shared next-hop tuples and route keys, instead of 580."""
    __slots__ = ("pkey", "type", "nexthops", "proto", "metric", "table", "installed_type", "key", "word_bits",
                 "group", "_prefix")
    _FIELDS = ("prefix", "type", "nexthops", "proto", "metric", "table")

    def __init__(self, prefix: IPNetwork, type: RouteType, nexthops: tuple[Nexthop, ...] = (),
                 proto: int = lo.RTPROT_BPFROUTER, metric: int = 0, table: int = TABLE_MAIN,
                 kernel_bits: int = 0, group: NexthopGroup | None = None):
        self._set(prefix_key(prefix), type, tuple(nexthops), proto, metric, table, kernel_bits, group)
        self._prefix = prefix

    @classmethod
    def from_key(cls, pkey: PrefixKey, type: RouteType, nexthops: tuple[Nexthop, ...], proto: int,
                 metric: int, table: int, kernel_bits: int = 0, group: NexthopGroup | None = None) -> Route:
        """Fast constructor for the netlink hot path: `prefix` is built only when read.
        kernel_bits: a RouteType.KERNEL route's kernel_route_bits. group: a
        multipath route's (its nexthops are the group's members)."""
        r = object.__new__(cls)
        r._set(pkey, type, nexthops, proto, metric, table, kernel_bits, group)
        r._prefix = None
        return r

    def _set(self, pkey: PrefixKey, type: RouteType, nexthops: tuple[Nexthop, ...], proto: int, metric: int,
             table: int, kernel_bits: int = 0, group: NexthopGroup | None = None) -> None:
        self.pkey, self.type, self.nexthops, self.proto, self.metric, self.table = \
            pkey, type, nexthops, proto, metric, table
        self.installed_type = installed_type = _installed_type(type, nexthops, group)
        if group is None and installed_type is RouteType.MULTIPATH:
            group = NexthopGroup(tuple((h, 1) for h in nexthops))
        self.group = group
        self.key = _route_key(pkey, table, metric, nexthops)
        self.word_bits = _word_bits(installed_type, pkey, proto) | kernel_bits

    @property
    def prefix(self) -> IPNetwork:
        if self._prefix is None:
            self._prefix = key_network(self.pkey)
        return self._prefix

    def _fields(self) -> tuple:
        return (self.pkey, self.type, self.nexthops, self.proto, self.metric, self.table, self.word_bits, self.group)

    def __eq__(self, other) -> bool:
        return isinstance(other, Route) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return "Route(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in self._FIELDS) + ")"

    def same_forwarding(self, other: Route | None) -> bool:
        """The same entry in the BPF FIB (a KERNEL route's next hops are not in it)."""
        return other is not None and self.word_bits == other.word_bits and \
            (self.nexthops == other.nexthops or self.installed_type is RouteType.KERNEL) and \
            self.group == other.group


@dataclass(frozen=True)
class BucketChange:
    """The kernel moved a bucket of a resilient group (RTM_NEWNEXTHOPBUCKET);
    it travels with route events, in their order."""
    kernel_id: int
    index: int
    hop: Nexthop | None


class FibError(Exception):
    pass


def _is_full(e: Exception) -> bool:
    """A table out of room (and nothing else)."""
    if isinstance(e, (DirFull, FibError, GroupSpaceFull)):
        return True
    return isinstance(e, BpfError) and e.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)


def _covering(pk: PrefixKey) -> list[PrefixKey]:
    """The keys of every prefix strictly shorter than pk that contains it."""
    version, addr, length = pk
    width = 32 if version == 4 else 128
    ones = (1 << width) - 1
    return [(version, addr & (ones ^ ((1 << (width - n)) - 1)), n) for n in range(length)]


def _inside(pk: PrefixKey, outer: PrefixKey) -> bool:
    """pk lies strictly inside outer (both of one IP version)."""
    width = 32 if pk[0] == 4 else 128
    shift = width - outer[2]
    return pk[2] > outer[2] and pk[1] >> shift == outer[1] >> shift


def _fib_key(prefix: IPNetwork):
    if prefix.version == 4:
        return lo.Route4Key(prefix.prefixlen, (lo.u8 * 4)(*prefix.network_address.packed))
    return lo.Route6Key(prefix.prefixlen, (lo.u8 * 16)(*prefix.network_address.packed))


def _key_prefix(key) -> IPNetwork:
    raw = bytes(key.addr)
    addr = ipaddress.ip_address(raw)
    return ipaddress.ip_network(f"{addr}/{key.prefixlen}")


class NexthopTable:
    """Reference-counted next-hop ids in the `nexthops` array map (id 0 unused).

    A freed id is cleared, and reused only after an RCU grace period (a packet
    that read a route naming it may still read it; grace.py) and after the
    ids freed before it (FIFO), so as late as possible."""

    def __init__(self, dp: Datapath):
        self.dp = dp
        self.ids: dict[Nexthop, int] = {}
        self.by_id: dict[int, Nexthop] = {}
        self.refs: dict[int, int] = {}
        self.free = FreeList(dp.nexthops.max_entries, grace=GRACE)
        self.next_id = 1

    def id_of(self, nh: Nexthop) -> int:
        """The next hop's id, written to the map first if it is new. Takes no
        reference: add_refs does, once the routes that use it are written."""
        nid = self.ids.get(nh)
        if nid is None:
            if self.next_id < self.dp.nexthops.max_entries:
                nid = self.next_id  # never used: no packet reads it
                self.next_id += 1
            elif self.free:
                nid = self.free.popleft()  # the oldest freed, after a grace period
            else:
                raise FibError(f"next-hop table full ({self.dp.nexthops.max_entries} entries)")
            self.dp.nexthops.update(lo.u32(nid), nexthop_value(nh))
            self.ids[nh], self.by_id[nid], self.refs[nid] = nid, nh, 0
        return nid

    def add_refs(self, nids: list[int] | np.ndarray) -> None:
        """One reference per entry of nids (0: none)."""
        refs = self.refs
        if len(nids) == 1:
            if nids[0]:
                refs[int(nids[0])] += 1
            return
        if isinstance(nids, np.ndarray):  # a bulk write's
            ids, counts = np.unique(nids, return_counts=True)
            pairs = zip(ids.tolist(), counts.tolist())
        else:
            pairs = Counter(nids).items()
        for nid, n in pairs:
            if nid:
                refs[nid] += n

    def release_routes(self, routes: list[Route | None]) -> None:
        """Drop the references of installed routes that were replaced or removed."""
        if len(routes) == 1:  # a single event
            r = routes[0]
            if r is not None and r.installed_type is RouteType.UNICAST and r.nexthops:
                self.release(self.ids.get(r.nexthops[0], 0))
            return
        seen: dict[int, int] = {}  # id(Nexthop) -> its id, as in Fib._write_many
        counts: Counter[int] = Counter()
        for r in routes:
            if r is not None and r.installed_type is RouteType.UNICAST and r.nexthops:
                nh = r.nexthops[0]
                nid = seen.get(id(nh))
                if nid is None:
                    nid = seen[id(nh)] = self.ids.get(nh, 0)
                counts[nid] += 1
        for nid, n in counts.items():
            if nid:
                self.release(nid, n)

    def release(self, nid: int, n: int = 1) -> None:
        """Drop n references; the id is cleared and freed with its last."""
        if nid not in self.refs:
            return
        self.refs[nid] -= n
        if self.refs[nid] <= 0:
            nh = self.by_id.pop(nid)
            del self.ids[nh], self.refs[nid]
            self.dp.nexthops.update(lo.u32(nid), lo.NexthopValue())
            self.free.release([nid])

    def recover(self) -> None:
        """Rebuild ids from the pinned map (refcounts are rebuilt by Fib.recover)."""
        for k, v in self.dp.nexthops.lookup_batch():
            if v.ifindex:
                nh = nexthop_of_value(v)
                self.ids[nh], self.by_id[k.value], self.refs[k.value] = k.value, nh, 0
        self.next_id = max(self.by_id, default=0) + 1
        # the previous agent's freed ids: their grace period may not have passed
        self.free = FreeList(self.dp.nexthops.max_entries, grace=GRACE)
        self.free.release([i for i in range(1, self.next_id) if i not in self.by_id])

    def collect_unused(self) -> None:
        for nid in [i for i, r in self.refs.items() if r <= 0]:
            self.refs[nid] = 1
            self.release(nid)


class LpmTable:
    """One family's BPF_MAP_TYPE_LPM_TRIE (`--fib-impl lpm`)."""

    def __init__(self, m, version: int):
        self.map = m
        self.version = version

    def set(self, prefix: IPNetwork, value: lo.RouteValue) -> None:
        self.map.update(_fib_key(prefix), value)

    def set_key(self, addr: int, length: int, word: int) -> None:
        self.set_many([(self.version, addr, length)], [word])

    def set_many(self, pks: list[PrefixKey], words) -> None:
        """Prefix keys (version, address as int, length) and their route words
        (a list, or a uint64 array)."""
        self.map.update_batch([(_fib_key(key_network(pk)), lo.RouteValue.from_buffer_copy(int(w).to_bytes(8, "little")))
                               for pk, w in zip(pks, words, strict=True)])

    def delete(self, pk: PrefixKey) -> bool:
        return self.map.delete(_fib_key(key_network(pk)))

    def delete_many(self, pks: list[PrefixKey]) -> None:
        for pk in pks:
            self.delete(pk)

    def installed(self) -> list[tuple[IPNetwork, lo.RouteValue]]:
        return [(_key_prefix(k), v) for k, v in self.map.lookup_batch()]

    def installed_fields(self) -> tuple[list[PrefixKey], list[int], list[int], list[int]]:
        """DirTable.installed_fields: prefix keys, next-hop ids, types, protocols."""
        rows = [(prefix_key(p), v.nh_id, v.type, v.proto) for p, v in self.installed()]
        return tuple(map(list, zip(*rows, strict=True))) if rows else ([], [], [], [])  # type: ignore[return-value]

    def count(self) -> int:
        return self.map.count()

    def memory(self) -> dict[str, int]:
        """LPM trie nodes are allocated per route; the kernel reports them in fdinfo."""
        return {"impl": "lpm", "bytes": map_memlock(self.map.fd), "routes": self.count(),
                "routes_total": self.map.max_entries}

    def close(self) -> None:
        pass


class TableTrie(LpmTable):
    """One table's routes in its family's `tables4`/`tables6` LPM trie, whose
    keys start with the table id (bpf/include/tables.h)."""

    def __init__(self, m, version: int, table: int):
        super().__init__(m, version)
        self.table = table
        self.key_type = lo.Table4Key if version == 4 else lo.Table6Key
        self.width = 32 if version == 4 else 128

    def _key(self, pk: PrefixKey):
        k = self.key_type(prefixlen=32 + pk[2])
        k.table[:] = self.table.to_bytes(4, "big")
        k.addr[:] = pk[1].to_bytes(self.width // 8, "big")
        return k

    def set(self, prefix: IPNetwork, value: lo.RouteValue) -> None:
        self.map.update(self._key(prefix_key(prefix)), value)

    def set_many(self, pks: list[PrefixKey], words) -> None:
        self.map.update_batch([(self._key(pk), lo.RouteValue.from_buffer_copy(int(w).to_bytes(8, "little")))
                               for pk, w in zip(pks, words, strict=True)])

    def delete(self, pk: PrefixKey) -> bool:
        return self.map.delete(self._key(pk))

    def installed(self) -> list[tuple[IPNetwork, lo.RouteValue]]:
        net = ipaddress.IPv4Network if self.version == 4 else ipaddress.IPv6Network
        return [(net((int.from_bytes(bytes(k.addr), "big"), k.prefixlen - 32)), v) for k, v in self.map.lookup_batch()
                if int.from_bytes(bytes(k.table), "big") == self.table]

    def count(self) -> int:
        return len(self.installed())


def trie_tables(dp: Datapath) -> set[int]:
    """The table ids the `tables4`/`tables6` tries hold routes of."""
    return {int.from_bytes(bytes(k.table), "big") for m in ("tables4", "tables6") for k in dp.maps[m].keys()}


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


def make_tables(dp: Datapath, recover: bool = True) -> dict[int, "DirTable | HashTable6 | LpmTable"]:
    """The FIB structure the router was loaded with (the loader shrinks the unused one)."""
    m = dp.maps
    if m["dir4_top"].max_entries > 1:
        return {4: DirTable(m["dir4_groups"], m["dir4_leaves"], m["dir4_root_leaf"], m["dir4_group_leaf"],
                            CompressedRoot(m["dir4_top"], m["dir4_blocks"], m["dir4_run_entries"], writer=recover), recover),
                6: HashTable6(m["h6_buckets"], m["h6_leaf"], m["h6_filter"], m["h6_conf"], m["h6_active"],
                              m["dir6_leaves"], recover)}
    return {4: LpmTable(dp.fib4, 4), 6: LpmTable(dp.fib6, 6)}


RouteKey = tuple[int, int, int]  # Route.key: what tells routes of one prefix apart


def _best(routes: dict[RouteKey, Route]) -> Route:
    return min(routes.values(), key=lambda r: (r.table != TABLE_LOCAL, r.metric, r.key))


def _split_versions(pks: list[PrefixKey], words: np.ndarray) -> dict[int, tuple[list[PrefixKey], np.ndarray]]:
    """Prefix keys and route words by IP version."""
    is4 = np.fromiter(map(itemgetter(0), pks), np.uint8, len(pks)) == 4
    if is4.all():
        return {4: (pks, words)}
    if not is4.any():
        return {6: (pks, words)}
    out = {}
    for version, sel in ((4, np.nonzero(is4)[0]), (6, np.nonzero(~is4)[0])):
        out[version] = ([pks[i] for i in sel.tolist()], words[sel])
    return out


class Fib:
    """The kernel's routes by prefix, and the best of each written to the BPF FIB.

    Indexed by PrefixKey: at a million routes, hashing ipaddress objects costs
    seconds. Most prefixes have exactly one kernel route, so `kernel` maps each
    prefix straight to its best route, and only prefixes with several routes
    keep all of them in `alternates` (a dict per prefix cost a second per
    million routes)."""

    def __init__(self, dp: Datapath, table: int = TABLE_MAIN, main: "Fib | None" = None):
        """The image of local and main (table TABLE_MAIN), or, with `main`,
        the image of another table in the table tries, sharing main's next
        hops and groups."""
        self.dp = dp
        self.table = table
        if main is None:
            self.tables = make_tables(dp)
            self.nexthops = NexthopTable(dp)
            self.groups = GroupTable(dp, self.nexthops)
        else:
            self.tables = {4: TableTrie(dp.maps["tables4"], 4, table), 6: TableTrie(dp.maps["tables6"], 6, table)}
            self.nexthops, self.groups = main.nexthops, main.groups
        self.others: dict[int, Fib] = {}  # main's: the other tables' images
        self.generation = 0  # counts changes, for what is computed from the routes
        self._local_kind: tuple = ((), False)
        self.kernel: dict[PrefixKey, Route] = {}
        self.alternates: dict[PrefixKey, dict[RouteKey, Route]] = {}  # prefixes with 2+ routes
        self.installed: dict[PrefixKey, Route] = {}  # what the BPF FIB holds
        self.counts = {4: 0, 6: 0}  # installed prefixes per family, kept as they change
        # A full table: best routes left out, prefix keys covering one of them
        # (how many each; withheld while > 0), and why the last one was left out.
        self.left_out: dict[PrefixKey, Route] = {}
        self.covers: Counter[PrefixKey] = Counter()
        self.full_error: str | None = None
        self._logged_full = False
        self._retrying: set[PrefixKey] = set()  # left out, tried again by this change; covers still counted
        self.deletions = 0  # prefixes removed from the tables so far: room may have come back
        # IPv6 looks its local table up first, as a whole (fib6_rule_lookup without
        # custom rules): a local-table prefix shorter than /128 shadows every
        # longer main-table route inside it, which the FIB image then holds as local
        self.shadows6: set[PrefixKey] = set()
        self.resync_why = ""  # set when an event needs the routes read again (the agent does)

    # --- the kernel's routes ------------------------------------------------------
    def _add(self, r: Route, replace: bool) -> None:
        """A kernel route appeared. With replace (NLM_F_REPLACE), it takes the place
        of the routes with the same table and metric, as the kernel does; for IPv6
        those may be on other devices and no deletion is announced for them."""
        pk = r.pkey
        alts = self.alternates.get(pk)
        if alts is None:
            cur = self.kernel.get(pk)
            if cur is None or cur.key == r.key or (replace and cur.key[:2] == r.key[:2]):
                self.kernel[pk] = r
                return
            alts = self.alternates[pk] = {cur.key: cur}
        if replace:
            for key in [k for k in alts if k[:2] == r.key[:2]]:
                del alts[key]
        alts[r.key] = r
        self._settle(pk, alts)

    def _one_path_of_multipath(self, r: Route) -> bool:
        """An IPv6 route of one path with the table and metric of an installed
        multipath route of its prefix: `ip -6 route append` or `del ... via`
        changed one path of that route and announced only that path."""
        have = self.installed.get(r.pkey)
        return have is not None and have.installed_type is RouteType.MULTIPATH and have.key[:2] == r.key[:2]

    def _remove(self, r: Route) -> bool:
        """A kernel route went away; False if it was not known."""
        pk = r.pkey
        alts = self.alternates.get(pk)
        if alts is None:
            cur = self.kernel.get(pk)
            if cur is None or cur.key != r.key:
                return False
            del self.kernel[pk]
            return True
        if alts.pop(r.key, None) is None:
            return False
        self._settle(pk, alts)
        return True

    def _settle(self, pk: PrefixKey, alts: dict[RouteKey, Route]) -> None:
        """After a prefix's routes changed (at least one left): its best route."""
        if len(alts) == 1:
            del self.alternates[pk]
            self.kernel[pk] = next(iter(alts.values()))
        else:
            self.kernel[pk] = _best(alts)

    def update(self, route: Route, replace: bool = False) -> None:
        self.apply_batch([(True, replace, route)])

    def delete(self, route: Route) -> None:
        self.apply_batch([(False, False, route)])

    def apply_batch(self, events) -> int:
        """Apply route notifications, (new, replace, route) tuples, in one go:
        the RIB first, then one vectorized FIB write. Returns prefixes touched."""
        touched: set[PrefixKey] = set()
        add, remove = self._add, self._remove
        local6: list[PrefixKey] = []
        other: dict[int, list] = {}
        for new, replace, r in events:
            if r is None:
                continue
            if r.__class__ is BucketChange:
                self.groups.set_bucket(r.kernel_id, r.index, r.hop)
                continue
            if r.table != TABLE_MAIN and r.table != TABLE_LOCAL and self.table == TABLE_MAIN:
                other.setdefault(r.table, []).append((new, replace, r))
                continue
            if r.pkey[0] == 6 and r.key[2] and self._one_path_of_multipath(r):
                self.resync_why = "one path of an IPv6 multipath route changed"
            if r.table == TABLE_LOCAL and r.pkey[0] == 6:
                local6.append(r.pkey)
            if new:
                add(r, replace)
                touched.add(r.pkey)
            elif remove(r):
                touched.add(r.pkey)
        if local6:
            touched |= self._shadows_changed(local6)
        self._reconcile(touched)
        self.generation += 1
        n = len(touched)
        for table, evs in other.items():
            n += self.other(table).apply_batch(evs)
        return n

    def local_kind_elsewhere(self) -> bool:
        """Whether a table other than local and main holds a route the kernel's
        source check refuses (local, broadcast, multicast: RTYPE_LOCAL, or one
        only the kernel routes): with custom rules, the reverse lookup of a
        source may end there, which the fast path's check cannot follow."""
        gens = tuple((t, f.generation) for t, f in sorted(self.others.items()))
        if self._local_kind[0] != gens:
            kinds = (RouteType.LOCAL, RouteType.KERNEL)
            self._local_kind = (gens, any(r.installed_type in kinds for f in self.others.values()
                                          for r in f.installed.values()))
        return self._local_kind[1]

    def other(self, table: int) -> "Fib":
        """Another table's image (made when it is first needed)."""
        fib = self.others.get(table)
        if fib is None:
            fib = self.others[table] = Fib(self.dp, table, main=self)
        return fib

    def replace_all(self, routes: list[Route]) -> int:
        """Full resync with a fresh kernel dump; returns the number of prefixes changed."""
        if self.table == TABLE_MAIN and any(r.table != TABLE_MAIN and r.table != TABLE_LOCAL for r in routes) \
                or self.others:
            by_table: dict[int, list[Route]] = {t: [] for t in self.others}
            mine = []
            for r in routes:
                if r.table == TABLE_MAIN or r.table == TABLE_LOCAL:
                    mine.append(r)
                else:
                    by_table.setdefault(r.table, []).append(r)
            changed = sum(self.other(t).replace_all(rs) for t, rs in by_table.items())
            return changed + self._replace_own(mine)
        return self._replace_own(routes)

    def _replace_own(self, routes: list[Route]) -> int:
        self.generation += 1
        kernel = dict(zip(map(attrgetter("pkey"), routes), routes))
        alternates: dict[PrefixKey, dict[RouteKey, Route]] = {}
        if len(kernel) != len(routes):  # some prefixes have several routes
            several = {r.pkey for r in routes if kernel[r.pkey] is not r}
            for r in routes:
                if r.pkey in several:
                    alternates.setdefault(r.pkey, {})[r.key] = r
            for pk, alts in list(alternates.items()):
                if len(alts) == 1:  # the same route twice
                    del alternates[pk]
                kernel[pk] = _best(alts)
        self.kernel, self.alternates = kernel, alternates
        self.shadows6 = set()
        self._shadows_changed([r.pkey for r in routes if r.table == TABLE_LOCAL and r.pkey[0] == 6])
        if self.installed or self.left_out:  # (everything left out is tried again)
            changed = self._reconcile(kernel.keys() | self.installed.keys() | self.left_out.keys())
        else:
            changed = self._reconcile(kernel)
        for group in {id(r.group): r.group for r in self.installed.values()
                      if r.group is not None and r.group.resilient}.values():
            self.groups.sync(group)
        self._collect_unused()
        return changed

    # --- the BPF FIB ---------------------------------------------------------------
    def _shadows_changed(self, local6: list[PrefixKey]) -> set[PrefixKey]:
        """Bring shadows6 up to date for these IPv6 prefixes, which had local-table
        routes come or go; returns the prefixes whose image changes with it."""
        changed = []
        for pk in set(local6):
            best = self.kernel.get(pk)
            shadow = pk[2] < 128 and best is not None and best.table == TABLE_LOCAL
            if shadow != (pk in self.shadows6):
                (self.shadows6.add if shadow else self.shadows6.discard)(pk)
                changed.append(pk)
        if not changed:
            return set()
        return {pk for pk in self.kernel if pk[0] == 6 and any(_inside(pk, s) for s in changed)}

    def _want(self, pk: PrefixKey) -> Route | None:
        """The best kernel route of pk as the FIB image holds it (see shadows6)."""
        r = self.kernel.get(pk)
        if r is None or not self.shadows6 or pk[0] != 6 or r.table == TABLE_LOCAL:
            return r
        if any(_inside(pk, s) for s in self.shadows6):
            return Route.from_key(pk, RouteType.LOCAL, (), r.proto, r.metric, TABLE_LOCAL)
        return r

    def _reconcile(self, touched) -> int:
        """Make the BPF FIB hold the best route of each touched prefix, with one
        vectorized write; returns the number of prefixes changed."""
        changed = self._reconcile_touched(touched)
        if self._retrying:
            # the left-out prefixes tried again that went in (or went away): the
            # routes they alone kept withheld go back in, only now
            done = [pk for pk in self._retrying if pk not in self.left_out]
            self._retrying.clear()
            freed = self._release_covers(done)
            if freed:
                changed += self._reconcile_touched(freed)
        if bool(self.left_out) != self._logged_full:  # the log says when the table fills and empties
            self._logged_full = bool(self.left_out)
            if self.left_out:
                log.warning("FIB full (%s): %d routes left out of the fast path, with the routes "
                            "covering them; their traffic is passed to the kernel", self.full_error,
                            len(self.left_out))
            else:
                log.info("FIB no longer full: every route is in the fast path again")
        return changed

    def _reconcile_touched(self, touched) -> int:
        kernel, installed = self.kernel, self.installed
        if self.left_out:
            touched = self._retry_left_out(touched)
        covers = self.covers
        if not installed and touched is kernel and not self.shadows6:  # a first load: everything is new
            self._write_or_leave_out(list(kernel.values()), None, whole=kernel)
            return len(kernel)
        want_of = self._want if self.shadows6 else kernel.get
        if len(touched) == 1 and not covers:  # most netlink events: one prefix, without the batch's lists
            pk, = touched
            want, have = want_of(pk), installed.get(pk)
            if want is None:
                if have is None:
                    return 0
                self._delete_one(have)
                return 1
            if have is not None and want.same_forwarding(have):
                installed[pk] = want
                return 0
            try:
                self._write_one(want, have)
            except Exception as e:
                if not _is_full(e):
                    raise
                self._leave_out([want], e)
            return 1
        routes: list[Route] = []
        olds: list[Route | None] = []
        gone: list[Route] = []
        for pk in touched:
            want = want_of(pk) if not covers or pk not in covers else None  # withheld
            have = installed.get(pk)
            if want is None:
                if have is not None:
                    gone.append(have)
            elif have is not None and want.same_forwarding(have):
                installed[pk] = want
            else:
                routes.append(want)
                olds.append(have)
        self._delete_many(gone)
        self._write_or_leave_out(routes, olds)
        return len(routes) + len(gone)

    # --- a full table ---------------------------------------------------------------
    def _write_or_leave_out(self, routes: list[Route], olds: list[Route | None] | None,
                            whole: dict[PrefixKey, Route] | None = None) -> None:
        """_write_many; if a table is full, what fits is written (in chunks, then
        route by route) and the rest left out."""
        try:
            self._write_many(routes, olds, whole)
            return
        except Exception as e:
            if not _is_full(e):
                raise
            error = e
        # A failed batch may have written some routes: what the tables hold is
        # rewritten in place, the installed view and references fixed on the way.
        failed: list[Route] = []
        for i in range(0, len(routes), FALLBACK_CHUNK):
            chunk = routes[i:i + FALLBACK_CHUNK]
            try:
                self._write_many(chunk, [self.installed.get(r.pkey) for r in chunk])
                continue
            except Exception as e:
                if not _is_full(e):
                    raise
                error = e
            for r in chunk:
                have = self.installed.get(r.pkey)
                try:
                    self._write_one(r, have)
                except Exception as e:
                    if not _is_full(e):
                        raise
                    error = e
                    failed.append(r)
        if failed:
            self._leave_out(failed, error)

    def _leave_out(self, routes: list[Route], error: Exception) -> None:
        """Routes the tables had no room for: out of the fast path, with every
        installed route that covers one (its traffic would take them)."""
        withhold: list[Route] = []
        installed = self.installed
        for r in routes:
            pk = r.pkey
            if pk in self.left_out:
                continue
            self.left_out[pk] = r
            have = installed.get(pk)
            if have is not None:  # its old route, which the kernel no longer uses
                withhold.append(have)
            else:  # a write that failed after its table took the prefix (a full block half)
                try:
                    self.tables[pk[0]].delete(pk)
                except Exception as e:
                    if not _is_full(e):
                        raise
            if pk in self._retrying:
                continue  # its covers were never released
            for c in _covering(pk):
                self.covers[c] += 1
                if self.covers[c] == 1 and (cover := installed.get(c)) is not None:
                    withhold.append(cover)
        self._delete_many(list({id(r): r for r in withhold}.values()))
        self.full_error = str(error)

    def _retry_left_out(self, touched):
        """Touched prefixes that were left out get another try. The routes
        covering them stay withheld until they are in (_reconcile)."""
        left_out = self.left_out
        again = [pk for pk in touched if pk in left_out]
        for pk in again:
            del left_out[pk]
        self._retrying.update(again)
        return touched

    def _release_covers(self, pks: list[PrefixKey]) -> set[PrefixKey]:
        """Prefixes no longer left out: the kernel prefixes they alone withheld."""
        covers, freed = self.covers, set()
        for pk in pks:
            for c in _covering(pk):
                covers[c] -= 1
                if covers[c] <= 0:
                    del covers[c]
                    if c in self.kernel:
                        freed.add(c)
        return freed

    def retry_left_out(self) -> int:
        """Try the left-out routes again (room may have come back); returns how many went in."""
        before = len(self.left_out)
        if before:
            self._reconcile(set(self.left_out))
        return before - len(self.left_out)

    def full_status(self) -> dict | None:
        """What a full table left out, for status and metrics (None: nothing)."""
        if not self.left_out:
            self.full_error = None
            return None
        withheld = sum(1 for c in self.covers if c in self.kernel)
        return {"left_out": len(self.left_out), "withheld": withheld, "error": self.full_error}

    def _delete_many(self, gone: list[Route]) -> None:
        """Remove installed routes with one table call per family."""
        if not gone:
            return
        by_version: dict[int, list[PrefixKey]] = {4: [], 6: []}
        for r in gone:
            by_version[r.pkey[0]].append(r.pkey)
        for version, pks in by_version.items():
            if pks:
                self.tables[version].delete_many(pks)
                self.counts[version] -= len(pks)
        self.deletions += len(gone)
        installed = self.installed
        for r in gone:
            del installed[r.pkey]
        self._release(gone)

    def _delete_one(self, r: Route) -> None:
        """_delete_many for one installed route."""
        pk = r.pkey
        self.tables[pk[0]].delete(pk)
        self.counts[pk[0]] -= 1
        self.deletions += 1
        del self.installed[pk]
        self._release([r])

    def _release(self, routes: list[Route | None]) -> None:
        """Drop the next-hop and group references of replaced or removed routes."""
        self.nexthops.release_routes(routes)
        for r in routes:
            if r is not None and r.installed_type is RouteType.MULTIPATH:
                self.groups.release(self.groups.ids.get(r.group, 0))

    def _collect_unused(self) -> None:
        self.groups.collect_unused()
        self.nexthops.collect_unused()

    def _target(self, r: Route, old: Route | None) -> int:
        """The id a route's entry names: its next hop's, or its group's (a new
        group's table follows the one of the group it replaces, see ecmp.py)."""
        if r.installed_type is RouteType.UNICAST:
            return self.nexthops.id_of(r.nexthops[0])
        if r.installed_type is RouteType.MULTIPATH:
            return self.groups.id_of(r.group, old.group if old is not None else None)
        return 0

    def _write_one(self, r: Route, old: Route | None) -> None:
        """_write_many for one route, replacing `old` (None: a new prefix)."""
        pk = r.pkey
        try:
            nid = self._target(r, old)
            self.tables[pk[0]].set_key(pk[1], pk[2], r.word_bits | nid)
        except Exception:
            self._collect_unused()
            raise
        if r.installed_type is RouteType.MULTIPATH:
            self.groups.refs[nid] += 1
        elif nid:
            self.nexthops.refs[nid] += 1
        self.installed[pk] = r
        if old is None:
            self.counts[pk[0]] += 1
        else:
            self._release([old])

    def _write_many(self, routes: list[Route], olds: list[Route | None] | None = None,
                    whole: dict[PrefixKey, Route] | None = None) -> None:
        """Write routes with one table write per family; olds[i] is the installed
        route routes[i] replaces (olds None: all are new; whole: routes are
        whole's values, written into an empty FIB). Make-before-break: next hops
        first, old ones released after."""
        if not routes:
            return
        unicast, multipath, id_of = RouteType.UNICAST, RouteType.MULTIPATH, self.nexthops.id_of
        n = len(routes)
        gids: list[int] = []
        try:
            gids = [self.groups.id_of(r.group, olds[i].group if olds and olds[i] is not None else None)
                    for i, r in enumerate(routes) if r.installed_type is multipath]
        except Exception:
            self._collect_unused()
            raise
        if n <= 16:  # single events: numpy's per-call overhead would cost more than the work
            nids = [id_of(r.nexthops[0]) if r.installed_type is unicast else 0 for r in routes]
            pks = [r.pkey for r in routes]
            by_version: dict = {}
            group_ids = iter(gids)
            for r, nid in zip(routes, nids, strict=True):
                vpks, vwords = by_version.setdefault(r.pkey[0], ([], []))
                vpks.append(r.pkey)
                vwords.append(r.word_bits | (next(group_ids) if r.installed_type is multipath else nid))
        else:
            hops = [r.nexthops[0] if r.installed_type is unicast else None for r in routes]
            # by object identity: the decoder interns next hops, so this hashes a few
            by_identity = dict(zip(map(id, hops), hops))
            nid_of = {k: id_of(h) if h is not None else 0 for k, h in by_identity.items()}
            nids = np.fromiter(map(nid_of.__getitem__, map(id, hops)), np.uint64, n)
            pks = list(whole) if whole is not None else list(map(attrgetter("pkey"), routes))
            words = np.fromiter(map(attrgetter("word_bits"), routes), np.uint64, n) | nids
            if gids:
                at = [i for i, r in enumerate(routes) if r.installed_type is multipath]
                words[at] |= np.asarray(gids, np.uint64)
            by_version = _split_versions(pks, words)
        try:
            for version, (vpks, vwords) in by_version.items():
                self.tables[version].set_many(vpks, vwords)
        except Exception:  # e.g. table full: the RIB view stays as it was
            self._collect_unused()
            raise
        self.nexthops.add_refs(nids)
        self.groups.add_refs(gids)
        if whole is not None:
            self.installed = dict(whole)  # a copy of the table, no hashing
        else:
            self.installed.update(zip(pks, routes))
        for version, (vpks, _) in by_version.items():
            self.counts[version] += len(vpks)
        if olds:
            for old in olds:
                if old is not None:
                    self.counts[old.pkey[0]] -= 1
            self._release(olds)

    def close(self) -> None:
        for t in self.tables.values():
            t.close()

    # --- restart --------------------------------------------------------------
    def recover(self) -> None:
        """Read what the pinned maps hold, so a resync rewrites only differences."""
        if self.table == TABLE_MAIN:
            self.nexthops.recover()
            self.groups.recover(self.nexthops.by_id.get)
            for table in sorted(trie_tables(self.dp)):
                self.other(table).recover()
        by_id, unicast, multipath = self.nexthops.by_id, int(RouteType.UNICAST), int(RouteType.MULTIPATH)
        groups = self.groups.by_id
        types = {int(t): t for t in RouteType}
        for version, table in self.tables.items():
            pks, nids, rtypes, protos = table.installed_fields()
            hops = {nid: (by_id[nid],) for nid in set(nids) if nid in by_id}  # one tuple per next hop
            kernel = int(RouteType.KERNEL)
            routes = []
            for pk, nid, t, proto in zip(pks, nids, rtypes, protos, strict=True):
                group = groups.get(nid) if t == multipath else None
                if group is not None:
                    routes.append(Route.from_key(pk, types[t], group.hops, proto, 0, self.table, group=group))
                else:
                    routes.append(Route.from_key(pk, types[t], hops.get(nid, ()) if t == unicast else (), proto,
                                                 0, self.table, nid if t == kernel else 0))
            self.installed.update(zip(pks, routes))
            self.counts[version] += len(routes)
            self.nexthops.add_refs([nid for nid, t in zip(nids, rtypes, strict=True) if t == unicast and nid in hops])
            self.groups.add_refs([nid for nid, t in zip(nids, rtypes, strict=True) if t == multipath and nid in groups])

    # --- views ------------------------------------------------------------------
    def routes(self, prefix: IPNetwork | None = None, table: int | None = None) -> list[Route]:
        """The kernel's routes of local and main (table None), of one table, or
        of every table (table 0)."""
        if table == 0:
            return self.routes(prefix) + [r for t in sorted(self.others) for r in self.others[t].routes(prefix)]
        if table is not None and table not in (TABLE_MAIN, TABLE_LOCAL):
            return self.others[table].routes(prefix) if table in self.others else []
        keys = [prefix_key(prefix)] if prefix is not None else sorted(self.kernel)
        out = []
        for k in keys:
            alts = self.alternates.get(k)
            if alts is not None:
                out.extend(sorted(alts.values(), key=lambda r: r.key))
            elif k in self.kernel:
                out.append(self.kernel[k])
        if table is not None:
            out = [r for r in out if r.table == table]
        return out

    def installed_route(self, prefix: IPNetwork, table: int | None = None) -> Route | None:
        if table is not None and table not in (TABLE_MAIN, TABLE_LOCAL):
            return self.others[table].installed_route(prefix) if table in self.others else None
        return self.installed.get(prefix_key(prefix))

    def sizes(self) -> dict:
        return {"ipv4": self.counts[4], "ipv6": self.counts[6], "nexthops": len(self.nexthops.by_id),
                "nexthop_groups": len(self.groups.by_id),
                "tables": {str(t): {"ipv4": f.counts[4], "ipv6": f.counts[6]}
                           for t, f in sorted(self.others.items()) if f.counts[4] or f.counts[6]}}


def _sort_key(p: IPNetwork):
    return (p.version, p.network_address.packed, p.prefixlen)


def read_installed(dp: Datapath, table: int | None = None) -> list[tuple[IPNetwork, lo.RouteValue,
                                                                        tuple[Nexthop, ...], int]]:
    """The BPF FIB as the data plane sees it (for `route show` without the
    agent): each entry with its next hop, or a multipath route's group's
    members, and its table (0: the image of local and main). table: None
    for local and main, 0 for every table, else that table."""
    nhs = {k.value: nexthop_of_value(v) for k, v in dp.nexthops.lookup_batch() if v.ifindex}
    groups = {k.value: tuple(nhs[i] for i in v.nh[:v.count] if i in nhs)
              for k, v in dp.nh_groups.lookup_batch() if v.count}

    def hops(v: lo.RouteValue) -> tuple[Nexthop, ...]:
        if v.type == RouteType.UNICAST:
            return (nhs[v.nh_id],) if v.nh_id in nhs else ()
        if v.type == RouteType.MULTIPATH:
            return groups.get(v.nh_id, ())
        return ()
    out = []
    if table in (None, 0, TABLE_MAIN, TABLE_LOCAL):
        tables = make_tables(dp, recover=False)
        try:
            for t in tables.values():
                out.extend((prefix, v, hops(v), 0) for prefix, v in t.installed()
                           if table in (None, 0) or (v.type == RouteType.LOCAL) == (table == TABLE_LOCAL))
        finally:
            for t in tables.values():
                t.close()
    for tid in sorted(trie_tables(dp)):
        if table == 0 or table == tid:
            for version, m in ((4, "tables4"), (6, "tables6")):
                out.extend((prefix, v, hops(v), tid) for prefix, v in TableTrie(dp.maps[m], version, tid).installed())
    out.sort(key=lambda t: (t[3], *_sort_key(t[0])))
    return out
