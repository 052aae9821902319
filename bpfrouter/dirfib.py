"""The DIR FIB's writer: a multibit trie (24-bit root, 8-bit groups) in the
mmapable arrays of bpf/include/dirfib.h, written through numpy views of them.

Each entry holds what forwarding needs (route type and next-hop id); a
parallel array holds the entry's leaf (the prefix, its length and protocol),
read by probes, restarts and this module only.

Entries follow DPDK's rte_lpm rules. Every entry remembers the length of
the prefix that set it (its depth; kept here, in Python memory). A prefix of
length L writes only the entries in its range whose depth is <= L, so more
specific routes are never overwritten. Deleting it rewrites only the entries
of depth == L, with its longest covering prefix. Ranges that contain a group
carry the rule into the group.

What a packet can see during a change:
  - a new group is filled completely before the entry that points to it,
  - every entry is one aligned 32-bit store (a leaf is written before the
    entries that name it), and a route change rewrites its entries one store
    each,
  - freed leaves and groups are reused last (FIFO).
"""
from __future__ import annotations

import ipaddress
from collections import deque
from operator import itemgetter

import numpy as np

from .datapath import layout as lo
from .routespec import IPNetwork

EXT = np.uint32(lo.DIR_EXT)
ROOT_BITS = lo.DIR_ROOT_BITS


class DirFull(Exception):
    """The DIR FIB ran out of groups or leaves."""


def route_word(value: lo.RouteValue) -> int:
    """struct route as the little-endian 64-bit word it is in memory."""
    return int.from_bytes(bytes(value), "little")


def word_route(word: int) -> lo.RouteValue:
    return lo.RouteValue.from_buffer_copy(int(word).to_bytes(8, "little"))


def entry_of(word: int) -> int:
    """A route word's table entry: type in bits 28-30, next-hop id below."""
    return ((word >> 32) & 0x7) << lo.DIR_TYPE_SHIFT | (word & lo.DIR_NH_MASK)


def entries_of(words: np.ndarray) -> np.ndarray:
    return ((((words >> np.uint64(32)) & np.uint64(0x7)) << np.uint64(lo.DIR_TYPE_SHIFT))
            | (words & np.uint64(lo.DIR_NH_MASK))).astype(np.uint32)


def _plen_of(words: np.ndarray) -> np.ndarray:
    return ((words >> np.uint64(40)) & np.uint64(0xFF)).astype(np.uint8)


class DirTable:
    """One family's DIR FIB (IPv4: DIR-24-8; IPv6: up to 13 levels)."""

    def __init__(self, root_map, groups_map, leaves_map, root_leaf_map, group_leaf_map, width: int,
                 recover: bool = True):
        self.width = width
        self._mmaps = [m.mmap() for m in (root_map, groups_map, leaves_map, root_leaf_map, group_leaf_map)]
        n_root = root_map.max_entries * lo.DIR_CHUNK
        self.ngroups = groups_map.max_entries
        self.nleaves = leaves_map.max_entries
        words = leaves_map.info.value_size // 8
        self.root = np.frombuffer(self._mmaps[0], np.uint32, n_root)
        self.groups = np.frombuffer(self._mmaps[1], np.uint32, self.ngroups * 256).reshape(self.ngroups, 256)
        self.leaves = np.frombuffer(self._mmaps[2], np.uint64, self.nleaves * words).reshape(self.nleaves, words)
        self.root_leaf = np.frombuffer(self._mmaps[3], np.uint32, n_root)
        self.group_leaf = np.frombuffer(self._mmaps[4], np.uint32, self.ngroups * 256).reshape(self.ngroups, 256)
        self.root_depth = np.zeros(n_root, np.uint8)
        self.group_depth = np.zeros((self.ngroups, 256), np.uint8)
        self.version = 4 if width == 32 else 6
        # (version, address as int, length) -> leaf: the Fib's own prefix keys,
        # so a bulk load adds no tuple per route
        self.rules: dict[tuple[int, int, int], int] = {}
        self.free_groups: deque[int] = deque()
        self.free_leaves: deque[int] = deque()
        if recover:
            self._recover()

    def close(self) -> None:
        self.root = self.groups = self.leaves = self.root_leaf = self.group_leaf = None  # type: ignore[assignment]
        for m in self._mmaps:
            m.close()

    # --- helpers ----------------------------------------------------------------
    def _network(self, addr: int, length: int) -> IPNetwork:
        cls = ipaddress.IPv4Network if self.width == 32 else ipaddress.IPv6Network
        return cls((addr, length))

    def _top(self, addr: int) -> int:
        return addr >> (self.width - ROOT_BITS)

    def _byte(self, addr: int, level: int) -> int:
        return (addr >> (self.width - ROOT_BITS - 8 * (level + 1))) & 0xFF

    def _entry(self, leaf: int) -> int:
        """The table entry of a leaf's route: type and next-hop id (0: no route)."""
        return entry_of(int(self.leaves[leaf, 0])) if leaf else 0

    def _alloc_leaf(self) -> int:
        if not self.free_leaves:
            raise DirFull(f"IPv{self.version} DIR FIB full: {self.nleaves - 1} routes")
        return self.free_leaves.popleft()

    def _new_group(self, entry: int, leaf: int, depth: int) -> int:
        if not self.free_groups:
            raise DirFull(f"IPv{self.version} DIR FIB out of groups ({self.ngroups - 1}); "
                          f"raise --fib-groups")
        g = self.free_groups.popleft()
        self.group_depth[g] = depth
        self.group_leaf[g] = leaf
        self.groups[g] = entry  # filled before anything points to it
        return g

    def _write_leaf(self, leaf: int, addr: int, word: int) -> None:
        raw = addr.to_bytes(self.width // 8, "big").ljust((self.leaves.shape[1] - 1) * 8, b"\0")
        self.leaves[leaf, 1:] = np.frombuffer(raw, np.uint64)
        self.leaves[leaf, 0] = np.uint64(word)

    # --- range rules --------------------------------------------------------------
    def _apply(self, arr: np.ndarray, larr: np.ndarray, depth: np.ndarray, entry: int, leaf: int,
               new_depth: int, length: int, deleting: bool) -> None:
        """Apply a prefix of `length` to entries `arr` (a view) and the groups below.
        deleting: rewrite the entries the prefix set (depth == length), else the
        ones it covers (depth <= length)."""
        cur = arr.copy()
        ext = (cur & EXT) != 0
        hit = ~ext & ((depth == length) if deleting else (depth <= length))
        if hit.any():
            depth[hit] = new_depth
            larr[hit] = leaf
            arr[hit] = entry
        if ext.any():
            self._apply_groups(cur[ext] & ~EXT, entry, leaf, new_depth, length, deleting)

    def _apply_groups(self, gids: np.ndarray, entry: int, leaf: int, new_depth: int, length: int,
                      deleting: bool) -> None:
        while len(gids):
            block = self.groups[gids]
            lblock, dblock = self.group_leaf[gids], self.group_depth[gids]
            ext = (block & EXT) != 0
            hit = ~ext & ((dblock == length) if deleting else (dblock <= length))
            if hit.any():
                block[hit], lblock[hit], dblock[hit] = entry, leaf, new_depth
                self.group_depth[gids] = dblock
                self.group_leaf[gids] = lblock
                self.groups[gids] = block
            gids = block[ext] & ~EXT

    def _path(self, addr: int, length: int, create: bool) -> list[tuple[int, int]]:
        """Groups on the way to a prefix longer than the root: [(group, byte), ...]."""
        path = []
        idx = self._top(addr)
        e = self.root[idx]
        if not e & EXT:
            if not create:
                return []
            g = self._new_group(int(e), int(self.root_leaf[idx]), int(self.root_depth[idx]))
            self.root[idx] = EXT | np.uint32(g)
        else:
            g = int(e & ~EXT)
        level = 0
        while True:
            byte = self._byte(addr, level)
            path.append((g, byte))
            if length <= ROOT_BITS + 8 * (level + 1):
                return path
            e = self.groups[g, byte]
            if not e & EXT:
                if not create:
                    return path
                ng = self._new_group(int(e), int(self.group_leaf[g, byte]), int(self.group_depth[g, byte]))
                self.groups[g, byte] = EXT | np.uint32(ng)
                g = ng
            else:
                g = int(e & ~EXT)
            level += 1

    def _range(self, addr: int, length: int, create: bool):
        """(entries, leaves, depths) views covered by the prefix at its own level, and the path."""
        if length <= ROOT_BITS:
            start = self._top(addr) & ~((1 << (ROOT_BITS - length)) - 1)
            sl = slice(start, start + (1 << (ROOT_BITS - length)))
            return self.root[sl], self.root_leaf[sl], self.root_depth[sl], []
        path = self._path(addr, length, create)
        if not path or len(path) < (length - ROOT_BITS + 7) // 8:
            return None, None, None, path
        g, byte = path[-1]
        level_end = ROOT_BITS + 8 * len(path)
        start = byte & ~((1 << (level_end - length)) - 1)
        sl = slice(start, start + (1 << (level_end - length)))
        return self.groups[g, sl], self.group_leaf[g, sl], self.group_depth[g, sl], path

    # --- public ------------------------------------------------------------------------
    def set(self, prefix: IPNetwork, value: lo.RouteValue) -> None:
        self.set_key(int(prefix.network_address), prefix.prefixlen, route_word(value))

    def set_key(self, addr: int, length: int, word: int) -> None:
        entry = entry_of(word)
        key = (self.version, addr, length)
        leaf = self.rules.get(key)
        if leaf is not None:  # same prefix, new route: rewrite its entries
            self.leaves[leaf, 0] = np.uint64(word)
            arr, larr, depth, _ = self._range(addr, length, create=False)
            if arr is not None:
                self._apply(arr, larr, depth, entry, leaf, length, length, deleting=True)
            return
        leaf = self._alloc_leaf()
        self._write_leaf(leaf, addr, word)
        try:
            arr, larr, depth, _ = self._range(addr, length, create=True)
        except DirFull:
            self.leaves[leaf, 0] = 0
            self.free_leaves.appendleft(leaf)
            raise
        self.rules[key] = leaf
        self._apply(arr, larr, depth, entry, leaf, length, length, deleting=False)

    def delete(self, pk: tuple[int, int, int]) -> bool:
        """Remove the prefix with key (version, address as int, length)."""
        leaf = self.rules.pop(pk, None)
        if leaf is None:
            return False
        self._unset(pk[1], pk[2])
        self._free_leaves([leaf])
        return True

    def _unset(self, addr: int, length: int) -> None:
        """Give a removed prefix's entries to its longest covering prefix that stays."""
        parent_leaf, parent_len = self._parent(addr, length)
        arr, larr, depth, path = self._range(addr, length, create=False)
        if arr is not None:
            self._apply(arr, larr, depth, self._entry(parent_leaf), parent_leaf, parent_len, length,
                        deleting=True)
        self._collapse(addr, path)

    def _free_leaves(self, leaves: list[int]) -> None:
        """After no entry names them any more."""
        self.leaves[leaves, 0] = 0
        self.free_leaves.extend(leaves)

    def delete_many(self, pks: list[tuple[int, int, int]]) -> None:
        """Bulk removal (unknown prefixes are skipped): a withdrawn peer's table
        goes at array speed. Each removed prefix's entries go to its longest
        covering prefix that stays, so the order is free: shorter ones go first,
        so that groups below them are uniform, and fold, when the longer go."""
        rules = self.rules
        gone = [(pk, leaf) for pk in pks if (leaf := rules.pop(pk, None)) is not None]
        if not gone:
            return
        if not rules:  # the whole family goes
            self._clear()
        else:
            gone.sort(key=lambda g: g[0][2])
            short = [pk for pk, _ in gone if pk[2] <= ROOT_BITS]
            if len(short) > 16:  # numpy's per-call overhead outweighs vectorizing below that
                self._unset_short(short)
                gone_long = gone[len(short):]
            else:
                gone_long = gone
            for pk, _ in gone_long:
                self._unset(pk[1], pk[2])
        self._free_leaves([leaf for _, leaf in gone])

    def _unset_short(self, pks: list[tuple[int, int, int]]) -> None:
        n = len(pks)
        parents = [self._parent(pk[1], pk[2]) for pk in pks]
        p_leaf = np.fromiter(map(itemgetter(0), parents), np.uint32, n)
        p_len = np.fromiter(map(itemgetter(1), parents), np.uint8, n)
        p_entry = entries_of(self.leaves[p_leaf, 0])  # leaf 0's word is 0: no route
        shift = self.width - ROOT_BITS
        addrs = np.fromiter((pk[1] >> shift for pk in pks), np.int64, n)
        lens = np.fromiter(map(itemgetter(2), pks), np.int64, n)
        for length in np.unique(lens).tolist():
            sel = lens == length
            span = 1 << (ROOT_BITS - length)
            rows = addrs[sel] >> (ROOT_BITS - length)
            root, depth, leaf = (a.reshape(-1, span) for a in (self.root, self.root_depth, self.root_leaf))
            cur = root[rows]
            ext = (cur & EXT) != 0
            hit = ~ext & (depth[rows] == length)
            lv, ev, dv = p_leaf[sel][:, None], p_entry[sel][:, None], p_len[sel][:, None]
            depth[rows] = np.where(hit, dv, depth[rows])
            leaf[rows] = np.where(hit, lv, leaf[rows])
            root[rows] = np.where(hit, ev, cur)  # entries not hit get their own value again
            if ext.any():
                r, c = np.nonzero(ext)
                for gid, entry, lf, d in zip((cur[r, c] & ~EXT).tolist(), ev[r, 0].tolist(), lv[r, 0].tolist(),
                                             dv[r, 0].tolist(), strict=True):
                    self._apply_groups(np.array([gid]), entry, lf, d, length, deleting=True)

    def _clear(self) -> None:
        """No route left: every entry becomes 0 (a packet sees its old entry or
        none), and every group goes to the back of the free list."""
        self.root[:] = 0
        self.root_leaf[:] = 0
        self.root_depth[:] = 0
        free = np.zeros(self.ngroups, bool)
        free[0] = True
        free[list(self.free_groups)] = True
        self.free_groups.extend(np.nonzero(~free)[0].tolist())

    def _parent(self, addr: int, length: int) -> tuple[int, int]:
        for plen in range(length - 1, -1, -1):
            masked = addr & ~((1 << (self.width - plen)) - 1) if plen else 0
            leaf = self.rules.get((self.version, masked, plen))
            if leaf is not None:
                return leaf, plen
        return 0, 0

    def _collapse(self, addr: int, path: list[tuple[int, int]]) -> None:
        """Fold groups that became uniform back into their parent entry, deepest first."""
        for i in range(len(path) - 1, -1, -1):
            g, _ = path[i]
            row, lrow, drow = self.groups[g], self.group_leaf[g], self.group_depth[g]
            if (row[0] & EXT) or not (row == row[0]).all() or not (lrow == lrow[0]).all() \
                    or not (drow == drow[0]).all():
                return
            if i == 0:
                idx = self._top(addr)
                self.root_depth[idx], self.root_leaf[idx] = drow[0], lrow[0]
                self.root[idx] = row[0]
            else:
                pg, pbyte = path[i - 1]
                self.group_depth[pg, pbyte], self.group_leaf[pg, pbyte] = drow[0], lrow[0]
                self.groups[pg, pbyte] = row[0]
            self.free_groups.append(g)

    def set_many(self, pks: list[tuple[int, int, int]], words) -> None:
        """Bulk insert: prefix keys (version, address as int, length) and their
        route words (a list, or a uint64 array). New prefixes up to the root
        length are written vectorized, shortest first, so longer ones land on
        top; the rest go one by one."""
        if len(pks) <= 16:  # numpy's per-call overhead outweighs vectorizing
            for pk, w in zip(pks, words, strict=True):
                self.set_key(pk[1], pk[2], int(w))
            return
        words = np.asarray(words, np.uint64)
        rules = self.rules
        rewrites: list[tuple[tuple[int, int, int], int]] = []
        if rules:  # a new route for a known prefix rewrites that prefix's entries
            is_known = np.fromiter((pk in rules for pk in pks), bool, len(pks))
            if is_known.any():
                rewrites = [(pks[i], int(words[i])) for i in np.nonzero(is_known)[0].tolist()]
                fresh = np.nonzero(~is_known)[0]
                pks, words = [pks[i] for i in fresh.tolist()], words[fresh]
        n = len(pks)
        if n > len(self.free_leaves):  # checked before anything is written
            raise DirFull(f"IPv{self.version} DIR FIB full: {self.nleaves - 1} routes")
        for pk, w in rewrites:
            self.set_key(pk[1], pk[2], w)
        if not n:
            return
        lens = np.fromiter(map(itemgetter(2), pks), np.int64, n)
        short = lens <= ROOT_BITS
        long_ = np.nonzero(~short)[0].tolist()
        if len(long_) < n:
            if long_:
                sel = np.nonzero(short)[0]
                self._set_short([pks[i] for i in sel.tolist()], lens[sel], words[sel])
            else:
                self._set_short(pks, lens, words)
        for i in long_:
            self.set_key(pks[i][1], pks[i][2], int(words[i]))

    def _set_short(self, pks: list, lens: np.ndarray, words: np.ndarray) -> None:
        """New prefixes no longer than the root, vectorized."""
        n = len(pks)
        shift = self.width - ROOT_BITS
        if self.width == 32:
            full = np.fromiter(map(itemgetter(1), pks), np.uint32, n)
            addrs = (full >> np.uint32(shift)).astype(np.int64)
            # the leaf stores the address in network order, zero-padded
            addr_words = np.zeros((n, self.leaves.shape[1] - 1), np.uint64)
            addr_words[:, 0] = full.astype(">u4").view(np.uint32)
        else:
            addrs = np.fromiter((pk[1] >> shift for pk in pks), np.int64, n)
            addr_words = np.frombuffer(b"".join(pk[1].to_bytes(16, "big") for pk in pks),
                                       np.uint64).reshape(n, 2)
        entries = entries_of(words)
        popleft = self.free_leaves.popleft
        leaves = np.array([popleft() for _ in range(n)], np.int64)
        self.leaves[leaves, 1:] = addr_words
        self.leaves[leaves, 0] = words
        self.rules.update(zip(pks, leaves.tolist()))
        leaves32 = leaves.astype(np.uint32)
        for length in np.unique(lens).tolist():
            sel = lens == length
            span = 1 << (ROOT_BITS - length)
            # the root as rows of one prefix's span: a prefix of this length is a row
            rows = addrs[sel] >> (ROOT_BITS - length)
            order = np.argsort(rows)  # in address order, the rows' reads and stores stream
            rows = rows[order]
            root, depth, leaf = (a.reshape(-1, span) for a in (self.root, self.root_depth, self.root_leaf))
            cur = root[rows]
            ext = (cur & EXT) != 0
            cur_depth = depth[rows]
            hit = ~ext & (cur_depth <= length)
            lv, ev = leaves32[sel][order][:, None], entries[sel][order][:, None]
            depth[rows] = np.where(hit, np.uint8(length), cur_depth)
            leaf[rows] = np.where(hit, lv, leaf[rows])
            # whole rows are stored back: entries not hit get their own value again
            root[rows] = np.where(hit, ev, cur)
            if ext.any():
                r, c = np.nonzero(ext)
                for gid, entry, lf in zip((cur[r, c] & ~EXT).tolist(), ev[r, 0].tolist(), lv[r, 0].tolist(),
                                          strict=True):
                    self._apply_groups(np.array([gid]), entry, lf, length, length, deleting=False)

    def installed(self) -> list[tuple[IPNetwork, lo.RouteValue]]:
        live = np.nonzero(self.leaves[:, 0])[0]
        out = []
        for leaf in live.tolist():
            value = word_route(int(self.leaves[leaf, 0]))
            raw = self.leaves[leaf, 1:].tobytes()[: self.width // 8]
            out.append((self._network(int.from_bytes(raw, "big"), value.prefixlen), value))
        return out

    def _recover(self) -> None:
        """Rebuild the Python side (rules, depths, free lists) from the maps."""
        words = self.leaves[:, 0]
        plen = _plen_of(words)
        live = np.nonzero(words)[0]
        for leaf in live.tolist():
            raw = self.leaves[leaf, 1:].tobytes()[: self.width // 8]
            self.rules[(self.version, int.from_bytes(raw, "big"), int(plen[leaf]))] = leaf
        used = np.zeros(self.nleaves, bool)
        used[live] = True
        used[0] = True
        self.free_leaves = deque(np.nonzero(~used)[0].tolist())
        ext = (self.root & EXT) != 0
        self.root_depth[:] = np.where(ext, 0, plen[np.where(ext, 0, self.root_leaf)])
        in_use = np.zeros(self.ngroups, bool)
        in_use[0] = True
        gids = np.unique(self.root[ext] & ~EXT)
        while len(gids):
            in_use[gids] = True
            block = self.groups[gids]
            gext = (block & EXT) != 0
            self.group_depth[gids] = np.where(gext, 0, plen[np.where(gext, 0, self.group_leaf[gids])])
            gids = np.unique(block[gext] & ~EXT)
        self.free_groups = deque(np.nonzero(~in_use)[0].tolist())

    def count(self) -> int:
        return int(np.count_nonzero(self.leaves[:, 0]))

    def memory(self) -> dict[str, int]:
        """Bytes the structure holds in the kernel, and how full it is."""
        nbytes = sum(a.nbytes for a in (self.root, self.groups, self.leaves, self.root_leaf, self.group_leaf))
        return {"impl": "dir", "bytes": int(nbytes), "routes": self.count(),
                "groups_used": self._reachable_groups(self.root[(self.root & EXT) != 0] & ~EXT),
                "groups_total": self.ngroups - 1, "routes_total": self.nleaves - 1}

    def _reachable_groups(self, gids: np.ndarray) -> int:
        total = 0
        gids = np.unique(gids)
        while len(gids):
            total += len(gids)
            block = self.groups[gids]
            gids = np.unique(block[(block & EXT) != 0] & ~EXT)
        return total
