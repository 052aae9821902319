"""ECMP: next-hop groups in the BPF FIB (bpf/include/nexthop.h), and the
multipath hash fields the kernel's sysctls select.

A multipath route (RTA_MULTIPATH) or a route through a kernel next-hop group
(`ip nexthop add id N group ...`) is installed as RTYPE_MULTIPATH naming a
group id here, and each group has a bucket table: a flow takes bucket
hash % size. A resilient group's table is the kernel's, mirrored bucket by
bucket: the kernel decides which bucket goes to which member and when it
moves (its idle and unbalanced timers), and announces each move
(RTM_NEWNEXTHOPBUCKET). A hash-threshold group's table is filled here by
weight (fill_table), and when a route moves to another group (a path added
or removed) the new table keeps every bucket whose member stays: the kernel
would move flows between the remaining paths too, the fast path moves only
those that must move.

Groups are reference-counted by the routes that name them, and hold a
reference on each member's next-hop id. A group is written before the first
route naming it and cleared after the last is gone; its id and its buckets
are reused only after an RCU grace period (grace.py)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .datapath import layout as lo
from .dirfib import FreeList
from .grace import GRACE

if TYPE_CHECKING:
    from .fib import Nexthop, NexthopTable

log = logging.getLogger("bpfrouter.ecmp")

# The kernel's FIB_MULTIPATH_HASH_FIELD_* bits (include/net/ip_fib.h), and the
# fields each fib_multipath_hash_policy hashes (policy 3: the _fields sysctl).
SRC_IP, DST_IP, IP_PROTO, FLOWLABEL, SRC_PORT, DST_PORT = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
INNER_SRC_IP, INNER_DST_IP, INNER_IP_PROTO, INNER_FLOWLABEL = 0x40, 0x80, 0x100, 0x200
FIELD_NAMES = {SRC_IP: "src_ip", DST_IP: "dst_ip", IP_PROTO: "ip_proto", FLOWLABEL: "flowlabel",
               SRC_PORT: "src_port", DST_PORT: "dst_port", INNER_SRC_IP: "inner_src_ip",
               INNER_DST_IP: "inner_dst_ip", INNER_IP_PROTO: "inner_ip_proto", INNER_FLOWLABEL: "inner_flowlabel"}
POLICY_FIELDS = {
    4: {0: SRC_IP | DST_IP,
        1: SRC_IP | DST_IP | IP_PROTO | SRC_PORT | DST_PORT,
        2: SRC_IP | DST_IP | INNER_SRC_IP | INNER_DST_IP},
    6: {0: SRC_IP | DST_IP | FLOWLABEL | IP_PROTO,
        1: SRC_IP | DST_IP | IP_PROTO | SRC_PORT | DST_PORT,
        2: SRC_IP | DST_IP | FLOWLABEL | IP_PROTO | INNER_SRC_IP | INNER_DST_IP | INNER_FLOWLABEL | INNER_IP_PROTO},
}


def hash_fields(version: int, policy: int, custom: int) -> int:
    """The fields the kernel hashes for this family's fib_multipath_hash_policy
    (custom: its fib_multipath_hash_fields, used by policy 3). Policy 2 hashes
    the inner header of IP-in-IP packets in place of the outer one's fields;
    here both are hashed, which spreads the same flows the same way."""
    if policy == 3:
        return custom
    return POLICY_FIELDS[version].get(policy, POLICY_FIELDS[version][0])


def field_names(fields: int) -> list[str]:
    return [name for bit, name in FIELD_NAMES.items() if fields & bit]


HTHR_BUCKETS = 256  # a hash-threshold group's table: weight shares to 1/256


def quotas(weights: list[int], n: int) -> list[int]:
    """n buckets shared by weight (largest remainder: each share within one
    bucket of exact)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    out = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: (out[i] - exact[i], i))[:n - sum(out)]:
        out[i] += 1
    return out


def fill_table(members, n: int, previous: list | None = None) -> list:
    """A hash-threshold group's bucket table: each member gets buckets by
    weight. From the table of the group it replaces, every bucket whose
    member stays keeps it (up to the member's new share), so only the
    flows of a removed member, or of the buckets a new one takes, move."""
    want: dict = {}
    for hop, weight in members:  # (a next hop listed twice counts once, with both weights)
        want[hop] = want.get(hop, 0) + weight
    share = dict(zip(want, quotas(list(want.values()), n), strict=True))
    table: list = [None] * n
    have = dict.fromkeys(share, 0)
    if previous is not None and len(previous) == n:
        for i, hop in enumerate(previous):
            if hop in share and have[hop] < share[hop]:
                table[i] = hop
                have[hop] += 1
    for i in range(n):  # the rest, to the member furthest below its share: members interleave
        if table[i] is None:
            hop = max(share, key=lambda h: share[h] - have[h])
            table[i] = hop
            have[hop] += 1
    return table


@dataclass(frozen=True)
class NexthopGroup:
    """A multipath route's paths as the fast path spreads over them: its live
    members with their weights, in the kernel's order. Resilient groups are
    the kernel's object `kernel_id`, with its bucket table (`bucket_hops`, as
    decoded: not part of the identity, it changes in place)."""
    members: tuple[tuple[Nexthop, int], ...]
    kernel_id: int = 0
    buckets: int = 0            # resilient: the bucket count; 0: hash-threshold
    partial: bool = False       # the kernel's route has dead members, left out here
    bucket_hops: tuple = field(default=(), compare=False, hash=False)
    recovered: int = 0          # read back from the maps by a restarted agent: its group id (an
                                # identity of its own: weights are not in the maps)

    @property
    def resilient(self) -> bool:
        return self.buckets > 0

    @property
    def hops(self) -> tuple:
        return tuple(h for h, _ in self.members)

    def describe(self) -> dict:
        out = {"type": "resilient" if self.resilient else "hash-threshold",
               "paths": [{"dev_ifindex": h.ifindex, "gateway": str(h.gateway) if h.gateway else None, "weight": w}
                         for h, w in self.members]}
        if self.kernel_id:
            out["kernel_id"] = self.kernel_id
        if self.resilient:
            out["buckets"] = self.buckets
        return out


class BucketSpace:
    """First-fit ranges of nh_buckets; a freed range is reused only after a
    grace period (a packet may still read it)."""

    def __init__(self, size: int):
        self.free: list[tuple[int, int]] = [(0, size)]  # (start, length), sorted
        self.pending: list[tuple[int, int, int]] = []   # (grace tag, start, length)

    def take(self, n: int) -> int:
        for attempt in range(2):
            for i, (start, length) in enumerate(self.free):
                if length >= n:
                    self.free[i] = (start + n, length - n)
                    if length == n:
                        del self.free[i]
                    return start
            if attempt or not self.pending:
                break
            GRACE.wait(max(t for t, _, _ in self.pending))
            self._merge([(s, n_) for _, s, n_ in self.pending])
            self.pending.clear()
        raise GroupSpaceFull(f"no room for {n} buckets of a resilient group (nh_buckets: {lo.MAX_NH_BUCKETS})")

    def give(self, start: int, n: int) -> None:
        self.pending.append((GRACE.mark(), start, n))

    def _merge(self, ranges) -> None:
        merged: list[tuple[int, int]] = []
        for start, length in sorted(self.free + list(ranges)):
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self.free = merged


class GroupSpaceFull(Exception):
    pass


class GroupTable:
    """Reference-counted group ids in the `nh_groups` array map (id 0 unused),
    each with its bucket table in nh_buckets."""

    def __init__(self, dp, nexthops: NexthopTable):
        self.dp = dp
        self.nexthops = nexthops
        self.ids: dict[NexthopGroup, int] = {}
        self.by_id: dict[int, NexthopGroup] = {}
        self.refs: dict[int, int] = {}
        self.tables: dict[int, list] = {}        # group id -> each bucket's next hop
        self.bucket_base: dict[int, int] = {}    # group id -> its first bucket
        self.by_kernel: dict[int, int] = {}      # kernel group id -> group id (resilient)
        self.free = FreeList(lo.MAX_NH_GROUPS, grace=GRACE)
        self.next_id = 1
        self.space = BucketSpace(lo.MAX_NH_BUCKETS)
        self.bucket_moves = 0  # resilient buckets the kernel moved, applied

    def id_of(self, group: NexthopGroup, previous: NexthopGroup | None = None) -> int:
        """The group's id, written to the maps first if it is new: its
        members' next hops, its table (a hash-threshold group's derived from
        `previous`, the group the route had, when installed), then the group.
        Takes no reference: add_refs does."""
        gid = self.ids.get(group)
        if gid is not None:
            return gid
        if group.resilient:
            table = list(group.bucket_hops)
        else:
            prev = self.ids.get(previous) if previous is not None else None
            table = fill_table(group.members, HTHR_BUCKETS, self.tables.get(prev) if prev else None)
        if self.next_id < lo.MAX_NH_GROUPS:
            gid = self.next_id
            self.next_id += 1
        elif self.free:
            gid = self.free.popleft()
        else:
            from .fib import FibError
            raise FibError(f"next-hop group table full ({lo.MAX_NH_GROUPS} groups)")
        try:
            base = self.space.take(len(table))
        except GroupSpaceFull:
            self.free.release([gid])
            raise
        nids: list[int] = []
        self.bucket_base[gid], self.tables[gid] = base, [None] * len(table)
        try:
            for hop, _ in group.members:  # held by the group from now on
                nids.append(self.nexthops.id_of(hop))
                self.nexthops.refs[nids[-1]] += 1
            for i, hop in enumerate(table):
                self._set_bucket(gid, i, hop)
            v = lo.NhGroup(count=len(nids), buckets=len(table), bucket_base=base, kernel_id=group.kernel_id,
                           flags=(lo.NH_GROUP_F_PARTIAL if group.partial else 0)
                           | (lo.NH_GROUP_F_RESILIENT if group.resilient else 0))
            for i, nid in enumerate(nids):
                v.nh[i] = nid
            self.dp.nh_groups.update(lo.u32(gid), v)
        except Exception:  # (the next-hop table full, ...): give back what was taken
            for nid in nids:
                self.nexthops.release(nid)
            for hop in self.tables.pop(gid):
                if hop is not None:
                    self.nexthops.release(self.nexthops.ids.get(hop, 0))
            self.space.give(self.bucket_base.pop(gid), len(table))
            self.free.release([gid])
            raise
        if group.resilient:
            self.by_kernel[group.kernel_id] = gid
        self.ids[group], self.by_id[gid], self.refs[gid] = gid, group, 0
        return gid

    def _set_bucket(self, gid: int, index: int, hop: Nexthop) -> None:
        """A bucket's member; its next hop holds a reference per bucket."""
        nid = self.nexthops.id_of(hop)
        self.nexthops.refs[nid] += 1
        old = self.tables[gid][index]
        self.dp.nh_buckets.update(lo.u32(self.bucket_base[gid] + index), lo.u32(nid))
        self.tables[gid][index] = hop
        if old is not None:
            self.nexthops.release(self.nexthops.ids.get(old, 0))

    def set_bucket(self, kernel_id: int, index: int, hop: Nexthop | None) -> bool:
        """The kernel moved a bucket of resilient group kernel_id (RTM_NEWNEXTHOPBUCKET)."""
        gid = self.by_kernel.get(kernel_id)
        if gid is None or hop is None or index >= len(self.tables[gid]) or self.tables[gid][index] == hop:
            return False
        self._set_bucket(gid, index, hop)
        self.bucket_moves += 1
        return True

    def sync(self, group: NexthopGroup) -> int:
        """A fresh dump's table of an installed resilient group: the buckets
        that differ are rewritten (moves announced while events were lost)."""
        gid = self.ids.get(group)
        if gid is None or not group.resilient:
            return 0
        changed = [i for i, (have, want) in enumerate(zip(self.tables[gid], group.bucket_hops, strict=True))
                   if have != want]
        for i in changed:
            self._set_bucket(gid, i, group.bucket_hops[i])
        return len(changed)

    def add_refs(self, gids) -> None:
        for gid in gids:
            if gid:
                self.refs[gid] += 1

    def release(self, gid: int, n: int = 1) -> None:
        """Drop n references; the group is cleared and freed with its last."""
        if gid not in self.refs:
            return
        self.refs[gid] -= n
        if self.refs[gid] > 0:
            return
        group = self.by_id.pop(gid)
        del self.ids[group], self.refs[gid]
        v = self.dp.nh_groups.lookup(lo.u32(gid))
        self.dp.nh_groups.update(lo.u32(gid), lo.NhGroup())
        if v is not None:
            for nid in list(v.nh[:v.count]):
                self.nexthops.release(int(nid))
        if self.by_kernel.get(group.kernel_id) == gid:
            del self.by_kernel[group.kernel_id]
        table = self.tables.pop(gid)
        for hop in table:
            if hop is not None:
                self.nexthops.release(self.nexthops.ids.get(hop, 0))
        self.space.give(self.bucket_base.pop(gid), len(table))
        self.free.release([gid])

    def collect_unused(self) -> None:
        for gid in [g for g, r in self.refs.items() if r <= 0]:
            self.refs[gid] = 1
            self.release(gid)

    def recover(self, hop_of) -> None:
        """Rebuild groups from the pinned maps; hop_of(next-hop id) -> Nexthop.
        References come back with the routes (Fib.recover)."""
        for k, v in self.dp.nh_groups.lookup_batch():
            if not v.count:
                continue
            hops = [hop_of(v.nh[i]) for i in range(v.count)]
            table = [hop_of(self.dp.nh_buckets.lookup(lo.u32(v.bucket_base + i)).value) for i in range(v.buckets)]
            if None in hops or None in table:
                continue
            # the maps keep tables, not weights: the resync that follows writes each
            # route's group anew, its table derived from this one (its flows stay)
            resilient = bool(v.flags & lo.NH_GROUP_F_RESILIENT)
            group = NexthopGroup(tuple((h, 1) for h in hops), v.kernel_id, v.buckets if resilient else 0,
                                 bool(v.flags & lo.NH_GROUP_F_PARTIAL), tuple(table) if resilient else (),
                                 recovered=k.value)
            gid = k.value
            self.ids[group], self.by_id[gid], self.refs[gid] = gid, group, 0
            self.tables[gid], self.bucket_base[gid] = table, v.bucket_base
            refs = self.nexthops.refs
            for nid in [*v.nh[:v.count], *(self.nexthops.ids[h] for h in table)]:
                refs[nid] = refs.get(nid, 0) + 1
            if resilient:
                self.by_kernel[v.kernel_id] = gid
        self.next_id = max(self.by_id, default=0) + 1
        self.free = FreeList(lo.MAX_NH_GROUPS, grace=GRACE)
        self.free.release([i for i in range(1, self.next_id) if i not in self.by_id])
        self.space = BucketSpace(lo.MAX_NH_BUCKETS)
        self.space.free = _gaps(sorted((self.bucket_base[g], len(t)) for g, t in self.tables.items()),
                                lo.MAX_NH_BUCKETS)


def _gaps(used: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    for start, n in used:
        if start > pos:
            out.append((pos, start - pos))
        pos = max(pos, start + n)
    if pos < size:
        out.append((pos, size - pos))
    return out


def _sysctl(path: str, default: int = 0) -> int:
    try:
        with open(f"/proc/sys/net/{path}") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def read_hash_config(current_seed: int = 0) -> lo.EcmpHashConfig:
    """The multipath hash fields this namespace's sysctls select, per family.
    The seed is net.ipv4.fib_multipath_hash_seed when set (routers configured
    alike spread alike); else the one in use, or a random one."""
    cfg = lo.EcmpHashConfig()
    cfg.fields[0] = hash_fields(4, _sysctl("ipv4/fib_multipath_hash_policy"),
                                _sysctl("ipv4/fib_multipath_hash_fields", 0x37))
    cfg.fields[1] = hash_fields(6, _sysctl("ipv6/fib_multipath_hash_policy"),
                                _sysctl("ipv6/fib_multipath_hash_fields", 0x37))
    cfg.seed = _sysctl("ipv4/fib_multipath_hash_seed") or current_seed or int.from_bytes(os.urandom(4), "little") or 1
    return cfg


def mirror_hash_config(dp) -> bool:
    """Write the hash configuration if the sysctls changed; True if it did."""
    key = lo.u32(0)
    have = dp.ecmp_hash.lookup(key)
    want = read_hash_config(have.seed if have is not None else 0)
    if have is not None and bytes(have) == bytes(want):
        return False
    dp.ecmp_hash.update(key, want)
    log.info("multipath hash: IPv4 %s, IPv6 %s", "+".join(field_names(want.fields[0])),
             "+".join(field_names(want.fields[1])))
    return True
