"""IPv6's BPF FIB writer: hash levels (bpf/include/hashfib6.h), written
through numpy views of the mmapable maps.

A level is a hash table of the prefixes of one length; the data plane
probes the levels longest first. With more than H6_MAX_LEVELS lengths in
use, a prefix is stored expanded in the next longer level, and the levels
are chosen to store the fewest keys. Within a level, a key holds the
longest of the prefixes expanded to it (its depth: its leaf's length).

A key sits in one of two buckets of 5 slots (2 on levels longer than /64,
whose keys take two slots); each slot's leaf is in a parallel array. A
rebuild fills a level's slots to LOAD (85 %): the fewer buckets, the
fewer cache misses per lookup. Changes are written in place, in an order a
packet can read at any time (the header says how it reads them):
  - a new key: leaf, key, then entry; a removed key: entry 0,
  - keys moved to make room (up to MAX_MOVES, found breadth first): each
    only from its first bucket to its second, the new slot written before
    the old one is emptied, the last move first,
  - a rebuild (when a key finds no room, a new prefix length needs its own
    level, or a batch is large) writes every level into the other half of
    the buckets, which no packet has read since an RCU grace period
    (grace.py), and switches with one store to h6_active.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np

from .datapath import layout as lo
from .grace import GRACE
from .dirfib import DirFull, LeafTable, _offsets, _plen_of, entries_of, entry_of

M32, M64 = (1 << 32) - 1, (1 << 64) - 1
C1, C2, C3 = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
WIDTH = 128
LOAD = 0.85         # slots a rebuild fills: the buckets' footprint is what a lookup pays for
FULL_LOAD = 0.93    # ... when the space would not hold LOAD
KEEP_LOAD = 0.4     # a rebuild keeps a level's buckets while it fills at least this many of them
GROW = 1.5          # a level that ran out of room: this many times LOAD's buckets
MAX_MOVES = 4       # keys moved to make room for one
PLACE_ROUNDS = 500  # of a rebuild's cuckoo walk, before it gives the level more buckets
MAX_EXPAND = 256    # a new prefix stored as more keys than this rebuilds with new levels
SLOTS = lo.H6_SLOTS  # per bucket


def buckets_of(khi: int, klo: int, nbuckets: int) -> tuple[int, int, int]:
    """A key's two buckets in its level, and its bit in the second one's
    filter word (hashfib6.h: h6_find)."""
    x = ((khi * C1) ^ (klo * C2)) & M64
    h = ((x ^ (x >> 31)) * C3) & M64
    return ((h >> 32) * nbuckets) >> 32, ((h & M32) * nbuckets) >> 32, (h >> 32) & 63


def buckets_np(khi: np.ndarray, klo: np.ndarray, nbuckets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = (khi * np.uint64(C1)) ^ (klo * np.uint64(C2))
    h = (x ^ (x >> np.uint64(31))) * np.uint64(C3)
    nb = np.uint64(nbuckets)
    return ((((h >> np.uint64(32)) * nb) >> np.uint64(32)).astype(np.int64),
            (((h & np.uint64(M32)) * nb) >> np.uint64(32)).astype(np.int64),
            (h >> np.uint64(32)) & np.uint64(63))


def choose_levels(counts: np.ndarray, max_levels: int = lo.H6_MAX_LEVELS) -> list[int]:
    """The prefix lengths to give a level, shortest first, from the number
    of prefixes of each length: every length in use if they fit, else the
    ones that store the fewest keys (a prefix of length l in level L is
    2**(L-l) keys; the longest length in use is always a level)."""
    used = np.nonzero(counts)[0]
    if len(used) <= max_levels:
        return used.tolist()
    m = len(used)
    c = counts[used].astype(float)
    # cost[i, j]: keys of the lengths used[i+1..j] stored in a level at used[j] (i = -1: from the first)
    cost = np.full((m + 1, m), np.inf)
    for j in range(m):
        acc = 0.0
        for i in range(j, -1, -1):
            acc += c[i] * 2.0 ** (used[j] - used[i])
            cost[i, j] = acc  # row i: the previous level is used[i-1] (row 0: none)
    best = cost[0].copy()  # one level, ending at j
    back = [np.full(m, -1)]
    for _ in range(1, max_levels):
        # previous level at p < j: best[p] + keys of used[p+1..j]
        cand = best[:, None] + cost[1:, :]
        cand[np.tril_indices(m)] = np.inf
        arg = cand.argmin(axis=0)
        nxt = cand[arg, np.arange(m)]
        improve = nxt < best
        back.append(np.where(improve, arg, -2))
        best = np.where(improve, nxt, best)
    # walk back from the longest length
    levels, j = [], m - 1
    for t in range(len(back) - 1, -1, -1):
        p = back[t][j]
        if p == -2:
            continue
        levels.append(int(used[j]))
        if p == -1:
            break
        j = int(p)
    return sorted(levels)


@dataclass(eq=False)
class Level:
    length: int
    first: int      # its first bucket (absolute)
    nbuckets: int
    slots: dict[int, int] = field(default_factory=dict)  # key -> bucket * SLOTS + slot
    wide: bool = field(init=False)                # longer than /64: a key takes two slots
    slot_ids: tuple[int, ...] = field(init=False)  # where a key starts in a bucket

    def __post_init__(self) -> None:
        self.wide = self.length > 64
        self.slot_ids = (0, 2) if self.wide else tuple(range(SLOTS))

    def masks(self) -> tuple[int, int]:
        L = self.length
        return ((M64 << (64 - min(L, 64))) & M64, (M64 << (128 - L)) & M64 if L > 64 else 0)

    def key(self, addr: int) -> int:
        """The level's key of an address: its first `length` bits, as the
        high 64 bits (narrow levels) or all 128."""
        masked = addr & ~((1 << (WIDTH - self.length)) - 1) & ((1 << WIDTH) - 1)
        return masked if self.wide else masked >> 64

    def split(self, key: int) -> tuple[int, int]:
        return (key >> 64, key & M64) if self.wide else (key, 0)

    def buckets(self, key: int) -> tuple[int, int]:
        b1, b2, _ = buckets_of(*self.split(key), self.nbuckets)
        return self.first + b1, self.first + b2

    def filter_bit(self, key: int) -> tuple[int, int]:
        """The key's filter word (its second bucket's) and bit."""
        _, b2, bit = buckets_of(*self.split(key), self.nbuckets)
        return self.first + b2, bit


class HashTable6(LeafTable):
    """IPv6's BPF FIB: the interface of dirfib.DirTable, over hash levels."""

    def __init__(self, buckets_map, leaf_map, filter_map, conf_map, active_map, leaves_map, recover: bool = True):
        super().__init__(leaves_map, WIDTH)
        self._mmaps = [m.mmap() for m in (buckets_map, conf_map, active_map, filter_map, leaf_map)]
        nb = self.nbuckets = buckets_map.max_entries
        self.half = nb // 2
        raw64 = np.frombuffer(self._mmaps[0], np.uint64, nb * 8).reshape(nb, 8)
        raw32 = np.frombuffer(self._mmaps[0], np.uint32, nb * 16).reshape(nb, 16)
        self.keys, self.entry = raw64[:, :SLOTS], raw32[:, 2 * SLOTS:3 * SLOTS]
        self.leaf = np.frombuffer(self._mmaps[4], np.uint32, nb * (SLOTS + 1)).reshape(nb, SLOTS + 1)[:, :SLOTS]
        size = ctypes.sizeof(lo.H6Conf)
        self.conf = [lo.H6Conf.from_buffer(self._mmaps[1], i * size) for i in range(2)]
        self.active = np.frombuffer(self._mmaps[2], np.uint64, 1)
        self.filter = np.frombuffer(self._mmaps[3], np.uint64, nb)
        self.levels: list[Level] = []  # longest first, as the data plane probes them
        self.left_tag = [GRACE.mark(), GRACE.mark()]  # grace tag of when a rebuild last left each half
        self.rebuilds = self.moves = 0  # since this agent started
        if recover:
            self._recover_rules()
            self._recover_levels()

    def close(self) -> None:
        self.keys = self.entry = self.leaf = self.active = self.filter = None  # type: ignore[assignment]
        self.conf = []
        for m in self._mmaps:
            m.close()
        super().close()

    @property
    def cur(self) -> int:
        return int(self.active[0]) & 1

    def _space_full(self) -> DirFull:
        return DirFull(f"IPv6 FIB's hash levels full ({self.half * SLOTS} slots per half); raise --fib-groups")

    # --- reading the maps ---------------------------------------------------------
    def _read_levels(self) -> list[Level]:
        c = self.conf[self.cur]
        return [Level(int(c.lv[i].len), int(c.lv[i].first), int(c.lv[i].nbuckets))
                for i in range(min(int(c.nlevels), lo.H6_MAX_LEVELS))]

    def _recover_levels(self) -> None:
        """Each level's keys and slots, from the active half."""
        self.levels = self._read_levels()
        for lv in self.levels:
            region = slice(lv.first, lv.first + lv.nbuckets)
            b, s = np.nonzero(self.entry[region])
            hi = self.keys[region][b, s].tolist()
            if lv.wide:
                keys = [h << 64 | lo_ for h, lo_ in zip(hi, self.keys[region][b, s + 1].tolist(), strict=True)]
            else:
                keys = hi
            lv.slots = dict(zip(keys, ((b + lv.first) * SLOTS + s).tolist(), strict=True))

    def memory(self) -> dict:
        levels = self._read_levels()
        used_buckets = sum(lv.nbuckets for lv in levels)
        base = self.cur * self.half
        slots = int(np.count_nonzero(self.entry[base:base + self.half]))
        leaves = self.leaves.nbytes
        forwarded = ctypes.sizeof(lo.H6Bucket) + 8  # a bucket and its filter word
        return {"impl": "hash",
                "bytes": int(self.keys.shape[0] * (forwarded + ctypes.sizeof(lo.H6Leaves))
                             + 2 * ctypes.sizeof(lo.H6Conf) + leaves),
                "forwarding_bytes": int(used_buckets * forwarded + ctypes.sizeof(lo.H6Conf)),
                "routes": self.count(), "routes_total": self.nleaves - 1,
                "slots_used": slots, "slots_total": self.half * SLOTS,
                "levels": [lv.length for lv in levels], "rebuilds": self.rebuilds, "moves": self.moves}

    # --- slots ----------------------------------------------------------------------
    def _level_for(self, length: int) -> Level | None:
        """The shortest level at least `length` long (levels are longest first)."""
        found = None
        for lv in self.levels:
            if lv.length < length:
                break
            found = lv
        return found

    def _shorter(self, lv: Level) -> int:
        """The length of the next shorter level (-1: none)."""
        i = next(i for i, other in enumerate(self.levels) if other is lv)
        return self.levels[i + 1].length if i + 1 < len(self.levels) else -1

    def _free_slot(self, lv: Level, b: int) -> int | None:
        row = self.entry[b]
        for s in lv.slot_ids:
            if not row[s]:
                return s
        return None

    def _write_slot(self, lv: Level, b: int, s: int, key: int, entry: int, leaf: int) -> None:
        khi, klo = lv.split(key)
        self.leaf[b, s] = leaf
        self.keys[b, s] = khi
        if lv.wide:
            self.keys[b, s + 1] = klo
        self.entry[b, s] = entry  # last: the slot becomes live
        lv.slots[key] = b * SLOTS + s

    def _key_at(self, lv: Level, b: int, s: int) -> int:
        return int(self.keys[b, s]) << 64 | int(self.keys[b, s + 1]) if lv.wide else int(self.keys[b, s])

    def _insert(self, lv: Level, key: int, entry: int, leaf: int) -> bool:
        """Place a new key; False if neither bucket has room, even after
        moving up to MAX_MOVES keys, each from its first bucket to its second."""
        w, bit = lv.filter_bit(key)
        self.filter[w] |= np.uint64(1 << bit)  # before the key can be found
        b1, b2 = lv.buckets(key)
        for b in (b1, b2):
            s = self._free_slot(lv, b)
            if s is not None:
                self._write_slot(lv, b, s, key, entry, leaf)
                return True
        path = self._path_to_room(lv, (b1, b2))
        if path is None:
            return False
        b, s = path[-1]
        for prev_b, prev_s in reversed(path[:-1]):  # from the free slot back: each key into the slot just freed
            other = self._key_at(lv, prev_b, prev_s)
            self._write_slot(lv, b, s, other, int(self.entry[prev_b, prev_s]), int(self.leaf[prev_b, prev_s]))
            self.entry[prev_b, prev_s] = 0  # after its copy is live
            self.moves += 1
            b, s = prev_b, prev_s
        self._write_slot(lv, b, s, key, entry, leaf)
        return True

    def _path_to_room(self, lv: Level, start: tuple[int, int]) -> list[tuple[int, int]] | None:
        """A breadth-first search for a free slot reachable from the full
        buckets `start`, moving keys only from their first bucket to their
        second (what a concurrent probe, first bucket then second, tolerates).
        The slots whose keys move, in order, then the free slot; None if none
        within MAX_MOVES moves."""
        came_from: dict[int, tuple[int, int] | None] = {b: None for b in start}
        frontier = list(start)
        for _ in range(MAX_MOVES):
            nxt = []
            for b in frontier:
                for s in lv.slot_ids:
                    first, second = lv.buckets(self._key_at(lv, b, s))
                    if first != b or second in came_from:
                        continue
                    came_from[second] = (b, s)
                    t = self._free_slot(lv, second)
                    if t is not None:
                        path = [(second, t)]
                        step = came_from[second]
                        while step is not None:
                            path.append(step)
                            step = came_from[step[0]]
                        return path[::-1]
                    nxt.append(second)
            frontier = nxt
        return None

    def _expansion(self, lv: Level, addr: int, length: int) -> list[int]:
        """The level's keys a prefix is stored as."""
        first = lv.key(addr)
        step = 1 << (lv.length - length)
        unit = 1 << ((128 if lv.wide else 64) - lv.length)
        return [first + j * unit for j in range(step)]

    # --- single changes ---------------------------------------------------------------
    def set_key(self, addr: int, length: int, word: int) -> None:
        entry = entry_of(word)
        pk = (6, addr, length)
        leaf = self.rules.get(pk)
        if leaf is not None:  # same prefix, new route: its entries, one store each
            self.leaves[leaf, 0] = np.uint64(word)
            lv = self._level_for(length)
            for key in self._expansion(lv, addr, length):
                slot = lv.slots.get(key)
                if slot is not None and self.leaf[where := divmod(slot, SLOTS)] == leaf:
                    self.entry[where] = entry
            return
        leaf = self._alloc_leaf()
        self._write_leaf(leaf, addr, word)
        self.rules[pk] = leaf
        try:
            self._add(addr, length, entry, leaf)
        except DirFull:
            self.rules.pop(pk)
            self._unset_prefix(pk, leaf)
            self._free_leaves([leaf])
            raise

    def _add(self, addr: int, length: int, entry: int, leaf: int) -> None:
        lv = self._level_for(length)
        if lv is None or 1 << (lv.length - length) > MAX_EXPAND:
            self._rebuild()
            return
        for key in self._expansion(lv, addr, length):
            slot = lv.slots.get(key)
            if slot is None:
                if not self._insert(lv, key, entry, leaf):
                    self._rebuild(grow=lv.length)
                    return
                continue
            b, s = divmod(slot, SLOTS)
            if (int(self.leaves[self.leaf[b, s], 0]) >> 40) & 0xFF <= length:  # its depth
                self.leaf[b, s] = leaf
                self.entry[b, s] = entry

    def _unset(self, lv: Level, addr: int, length: int, leaf: int) -> None:
        """Give a removed prefix's keys to its longest covering prefix in the
        same level, or remove them."""
        pleaf, _ = self._parent(addr, length, shortest=self._shorter(lv) + 1)
        pentry = self._entry(pleaf)
        for key in self._expansion(lv, addr, length):
            slot = lv.slots.get(key)
            if slot is None:
                continue
            b, s = divmod(slot, SLOTS)
            if self.leaf[b, s] != leaf:
                continue
            if pleaf:
                self.leaf[b, s] = pleaf
                self.entry[b, s] = pentry
            else:
                self.entry[b, s] = 0
                del lv.slots[key]

    def _unset_prefix(self, pk: tuple[int, int, int], leaf: int) -> None:
        """_unset in the level that stores the prefix, if one does."""
        lv = self._level_for(pk[2])
        if lv is not None:
            self._unset(lv, pk[1], pk[2], leaf)

    def delete(self, pk: tuple[int, int, int]) -> bool:
        leaf = self.rules.pop(pk, None)
        if leaf is None:
            return False
        self._unset_prefix(pk, leaf)
        self._free_leaves([leaf])
        return True

    # --- batches ------------------------------------------------------------------------
    def _bulk(self, n: int) -> bool:
        """A change of n prefixes is cheaper as a rebuild."""
        return n > 64 and n * 5 > len(self.rules)

    def set_many(self, pks: list[tuple[int, int, int]], words) -> None:
        words = np.asarray(words, np.uint64)
        rules = self.rules
        is_new = np.fromiter((pk not in rules for pk in pks), bool, len(pks))
        new = np.nonzero(is_new)[0]
        if len(new) > len(self.free_leaves):  # checked before anything is written
            raise self._full()
        for i in np.nonzero(~is_new)[0].tolist():
            self.set_key(pks[i][1], pks[i][2], int(words[i]))
        if not self._bulk(len(new)):
            for i in new.tolist():
                self.set_key(pks[i][1], pks[i][2], int(words[i]))
            return
        npks = [pks[i] for i in new.tolist()]
        leaves = self.free_leaves.take(len(npks))
        addrs = b"".join(pk[1].to_bytes(16, "big") for pk in npks)
        self.leaves[leaves, 1:3] = np.frombuffer(addrs, np.uint64).reshape(-1, 2)
        self.leaves[leaves, 0] = words[new]
        rules.update(zip(npks, leaves.tolist()))
        try:
            self._rebuild()
        except DirFull:
            for pk in npks:
                del rules[pk]
            self._free_leaves(leaves.tolist())
            raise

    def delete_many(self, pks: list[tuple[int, int, int]]) -> None:
        rules = self.rules
        gone = [(pk, leaf) for pk in pks if (leaf := rules.pop(pk, None)) is not None]
        if not gone:
            return
        if self._bulk(len(gone)) or not rules:
            self._rebuild()
        else:
            for pk, leaf in gone:
                self._unset_prefix(pk, leaf)
        self._free_leaves(list(map(itemgetter(1), gone)))

    # --- rebuild ------------------------------------------------------------------------
    def _plan(self, keys: "_Keys", lengths: list[int], base: int, load: float, grow: int | None) -> list | None:
        """Each level's buckets and its keys' places, longest first, from
        bucket `base` on; None if they do not fit in the half. A level keeps
        the buckets it had while they stay at least KEEP_LOAD full (room a
        level grew into is not given back at the next rebuild)."""
        plans = []
        first = base
        had = {lv.length: lv.nbuckets for lv in self.levels}
        for L in reversed(lengths):
            khi, klo, kentry, kleaf = (a[keys.level == L] for a in (keys.hi, keys.lo, keys.entry, keys.leaf))
            cap = 2 if L > 64 else SLOTS
            nb = math.ceil(len(khi) / (cap * load) * (GROW if L == grow else 1))
            if load <= LOAD:
                nb = max(nb, min(had.get(L, 0), math.ceil(len(khi) / (cap * KEEP_LOAD))))
            nb = max(1, nb)
            while (placed := _place(khi, klo, nb, cap)) is None:
                nb = math.ceil(nb * 1.1)
                if first + nb > base + self.half:
                    return None
            plans.append((L, first, nb, khi, klo, kentry, kleaf, placed))
            first += nb
            if first > base + self.half:
                return None
        return plans

    def _rebuild(self, grow: int | None = None) -> None:
        """Every level from the rules, into the other half; then the switch.
        grow: a level that ran out of room gets GROW times its buckets."""
        leaves = np.fromiter(self.rules.values(), np.int64, len(self.rules))
        words = self.leaves[leaves, 0]
        lens = _plen_of(words).astype(np.int64)
        hi = self.leaves[leaves, 1].byteswap()  # the address, stored big-endian
        lo_ = self.leaves[leaves, 2].byteswap()
        lengths = choose_levels(np.bincount(lens, minlength=WIDTH + 1)) if len(leaves) else []
        if lengths:  # checked before expanding: a badly spread table could be too many keys to build
            stored = np.asarray(lengths)[np.searchsorted(lengths, lens)]
            if float(np.exp2((stored - lens).astype(float)).sum()) > self.half * SLOTS:
                raise self._space_full()
        keys = _expand(lengths, lens, hi, lo_, entries_of(words), leaves)
        other = 1 - self.cur
        base = other * self.half
        # usual headroom first; with little space left, less (cuckoo placement holds to over 90 %)
        for load, grown in ((LOAD, grow), (LOAD, None), (FULL_LOAD, None)):
            plans = self._plan(keys, lengths, base, load, grown)
            if plans is not None:
                break
        else:
            raise self._space_full()
        GRACE.wait(self.left_tag[other])
        self.entry[base:base + self.half] = 0
        self.filter[base:base + self.half] = 0
        conf = self.conf[other]
        levels = []
        for i, (L, first, nb, khi, klo, kentry, kleaf, (b, s)) in enumerate(plans):
            lv = Level(L, first, nb)
            b = b + first
            if lv.wide:
                s = s * 2
                self.keys[b, s + 1] = klo
            self.leaf[b, s] = kleaf
            self.keys[b, s] = khi
            self.entry[b, s] = kentry
            _, b2, bit = buckets_np(khi, klo, nb)
            np.bitwise_or.at(self.filter, b2 + first, np.uint64(1) << bit)
            hkeys = khi.tolist()
            if lv.wide:
                hkeys = [h << 64 | lo_ for h, lo_ in zip(hkeys, klo.tolist(), strict=True)]
            lv.slots = dict(zip(hkeys, (b * SLOTS + s).tolist(), strict=True))
            mask_hi, mask_lo = lv.masks()
            conf.lv[i].mask_hi, conf.lv[i].mask_lo = mask_hi, mask_lo
            conf.lv[i].first, conf.lv[i].nbuckets, conf.lv[i].len, conf.lv[i].wide = first, nb, L, int(lv.wide)
            levels.append(lv)
        conf.nlevels = len(levels)
        left = self.cur
        self.active[0] = other  # the switch: one aligned store
        self.left_tag[left] = GRACE.mark()
        self.levels = levels
        self.rebuilds += 1


@dataclass
class _Keys:
    level: np.ndarray
    hi: np.ndarray
    lo: np.ndarray
    entry: np.ndarray
    leaf: np.ndarray


def _expand(lengths: list[int], lens: np.ndarray, hi: np.ndarray, lo_: np.ndarray, entries: np.ndarray,
            leaves: np.ndarray) -> _Keys:
    """Every prefix as the keys of its level (the shortest level at least as
    long), and per key the longest prefix that expands to it."""
    if not lengths:
        z = np.zeros(0, np.uint64)
        return _Keys(np.zeros(0, np.int64), z, z, z.astype(np.uint32), z.astype(np.uint32))
    levels = np.asarray(lengths, np.int64)
    L = levels[np.searchsorted(levels, lens)]
    extra = L - lens
    n = (np.int64(1) << extra)
    rep = np.repeat(np.arange(len(lens)), n)
    j = _offsets(n).astype(np.uint64)
    shift = (WIDTH - L)[rep]  # where the expansion's bits start
    in_hi = shift >= 64
    khi = hi[rep] | np.where(in_hi, j << np.minimum(np.maximum(shift - 64, 0), 63).astype(np.uint64),
                             np.where(shift == 0, np.uint64(0),
                                      j >> np.minimum(np.maximum(64 - shift, 0), 63).astype(np.uint64)))
    klo = lo_[rep] | np.where(in_hi, np.uint64(0), j << np.minimum(shift, 63).astype(np.uint64))
    klen = lens[rep]
    klevel = L[rep]
    order = np.lexsort((klen, klo, khi, klevel))
    khi, klo, klevel, rep = khi[order], klo[order], klevel[order], rep[order]
    last = np.ones(len(order), bool)  # the longest prefix of each key sorts last
    last[:-1] = (khi[1:] != khi[:-1]) | (klo[1:] != klo[:-1]) | (klevel[1:] != klevel[:-1])
    rep = rep[last]
    return _Keys(klevel[last], khi[last], klo[last], entries[rep], leaves[rep].astype(np.uint32))


def _place(khi: np.ndarray, klo: np.ndarray, nb: int, cap: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Each key's bucket (relative) and position in it (0..cap-1), or None
    if the keys do not fit: greedy by first bucket, then by second, then
    rounds of a vectorized cuckoo walk for the rest, each taking a random
    slot of one of its buckets, whose key tries again (nothing is visible
    yet: any key may move)."""
    k = len(khi)
    b1, b2, _ = buckets_np(khi, klo, nb)
    bucket = np.full(k, -1, np.int64)
    pos = np.zeros(k, np.int64)
    occ = np.zeros(nb, np.int64)  # a bucket's slots 0..occ-1 are taken
    owner = np.full((nb, cap), -1, np.int64)
    rng = np.random.default_rng(k)
    rest = np.arange(k)
    for _ in range(PLACE_ROUNDS):
        for choice in (b1, b2):
            if not len(rest):
                return bucket, pos
            order = rest[np.argsort(choice[rest], kind="stable")]
            sb = choice[order]
            p = occ[sb] + np.arange(len(order)) - np.searchsorted(sb, sb)
            ok = p < cap
            bucket[order[ok]], pos[order[ok]] = sb[ok], p[ok]
            owner[sb[ok], p[ok]] = order[ok]
            occ += np.bincount(sb[ok], minlength=nb)
            rest = order[~ok]
        if not len(rest):
            return bucket, pos
        # the rest take a random slot each (one key per slot), and its key tries again
        c = np.where(rng.random(len(rest)) < 0.5, b1[rest], b2[rest])
        t = rng.integers(0, cap, len(rest))
        _, win = np.unique(c * cap + t, return_index=True)
        w, c, t = rest[win], c[win], t[win]
        evicted = owner[c, t]
        owner[c, t] = w
        bucket[w], pos[w] = c, t
        bucket[evicted] = -1
        lost = np.ones(len(rest), bool)
        lost[win] = False
        rest = np.concatenate((rest[lost], evicted))
    return None
