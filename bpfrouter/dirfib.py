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
import time
from collections import deque

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


class CompressedRoot:
    """IPv4's 24-bit root as the data plane reads it (bpf/include/dirfib.h):
    per /16, either the one entry its 256 root entries share (in top), or a
    block: a 256-bit map of where runs of equal entries start, then the runs'
    entries, 8-byte aligned. About 6 MiB at a full table, where the root
    itself is 64 MiB.

    DirTable keeps the root in Python memory and hands the /16s it changed to
    update(), which writes each a new block into free space before the top
    store that switches to it (one aligned 32-bit store). Freed blocks wait
    GRACE_S before reuse: a packet reads a /16's top and block within
    microseconds (XDP runs to completion in softirq)."""

    GRACE_S = 0.01
    SLOTS = 1 << (ROOT_BITS - lo.DIR_TOP_BITS)  # root entries per /16

    def __init__(self, top_map, blocks_map):
        self._mmaps = [m.mmap() for m in (top_map, blocks_map)]
        self.ntop = top_map.max_entries * lo.DIR_CHUNK
        self.nwords = blocks_map.max_entries
        self.top = np.frombuffer(self._mmaps[0], np.uint32, self.ntop)
        self.words = np.frombuffer(self._mmaps[1], np.uint64, self.nwords)
        self.u32 = np.frombuffer(self._mmaps[1], np.uint32, self.nwords * 2)
        self.blocks_mm = self._mmaps[1]
        self._starts_scratch = np.ones(self.SLOTS, bool)  # [0] stays True: a /16's first entry starts a run
        self.block_words = np.zeros(self.ntop, np.int64)  # per /16: its block's size (0: none)
        self.free: dict[int, deque[int]] = {}  # size in words -> free stretches of that size
        self.bump = 0                           # words from here on were never used
        self.limbo: deque[tuple[float, int, int]] = deque()  # (freed at, first word, words)
        self._recover()

    def close(self) -> None:
        self.top = self.words = self.u32 = self.blocks_mm = None  # type: ignore[assignment]
        for m in self._mmaps:
            m.close()

    @staticmethod
    def _size(runs: np.ndarray) -> np.ndarray:
        """A block's size in 8-byte words."""
        return (lo.DIR_BLOCK_HEAD + 4 * runs + 7) // 8

    # --- reading -----------------------------------------------------------
    def _starts(self, first: np.ndarray) -> np.ndarray:
        """(k, 256) bools: where runs start in the blocks at these words."""
        raw = np.ascontiguousarray(self.words[first[:, None] + np.arange(4)]).view(np.uint8)
        return np.unpackbits(raw, axis=1, bitorder="little").astype(bool)

    def _blocked(self) -> tuple[np.ndarray, np.ndarray]:
        """The /16s with a block, and each block's first word."""
        chunks = np.nonzero((self.top & EXT) != 0)[0]
        return chunks, (self.top[chunks] & ~EXT).astype(np.int64)

    def _run_entries(self, first: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """(k, 256) root entries of blocks."""
        return self.u32[np.cumsum(starts, axis=1) - 1 + (first * 2 + lo.DIR_BLOCK_HEAD // 4)[:, None]]

    def expand(self) -> np.ndarray:
        """The 24-bit root the maps hold (for a restarted agent)."""
        root = np.empty((self.ntop, self.SLOTS), np.uint32)
        ext = (self.top & EXT) != 0
        root[~ext] = self.top[~ext][:, None]
        chunks, first = self._blocked()
        if len(chunks):
            root[chunks] = self._run_entries(first, self._starts(first))
        return root.ravel()

    def live_entries(self) -> np.ndarray:
        """The root entries of every run in use (each run once: no decoding to 256 per /16)."""
        chunks, first = self._blocked()
        if not len(chunks):
            return np.zeros(0, np.uint32)
        n = self._starts(first).sum(axis=1)
        offsets = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        return self.u32[np.repeat(first * 2 + lo.DIR_BLOCK_HEAD // 4, n) + offsets]

    def memory(self) -> dict[str, int]:
        chunks, _ = self._blocked()
        used = int(self.block_words[chunks].sum()) * 8
        return {"bytes": int(self.top.nbytes + self.words.nbytes), "forwarding_bytes": int(self.top.nbytes + used),
                "blocks": int(len(chunks))}

    # --- allocation ------------------------------------------------------------
    def _recover(self) -> None:
        chunks, first = self._blocked()
        if not len(chunks):
            return
        self.block_words[chunks] = self._size(self._starts(first).sum(axis=1))
        order = np.argsort(first)
        start, size = first[order], self.block_words[chunks][order]
        end = start + size
        self.bump = int(end[-1])
        gap_starts = np.concatenate(([0], end[:-1]))
        for g, n in zip(gap_starts.tolist(), (start - gap_starts).tolist(), strict=True):
            if n > 0:
                self.free.setdefault(n, deque()).append(g)

    def _release_limbo(self, wait: bool = False) -> None:
        """Make what was freed at least GRACE_S ago reusable (wait: all of it)."""
        if wait and self.limbo:
            time.sleep(max(0.0, self.limbo[-1][0] + self.GRACE_S - time.monotonic()))
        now = time.monotonic()
        while self.limbo and self.limbo[0][0] + self.GRACE_S <= now:
            _, first, n = self.limbo.popleft()
            self.free.setdefault(n, deque()).append(first)

    def _alloc_one(self, n: int) -> int | None:
        exact = self.free.get(n)
        if exact:
            return exact.popleft()
        if self.bump + n <= self.nwords:
            self.bump += n
            return self.bump - n
        for size in sorted(k for k, v in self.free.items() if k > n and v):
            first = self.free[size].popleft()
            self.free.setdefault(size - n, deque()).append(first + n)
            return first
        return None

    def _alloc(self, sizes: np.ndarray) -> np.ndarray:
        """First words of new blocks of these sizes, or DirFull (nothing taken)."""
        for attempt in range(2):
            self._release_limbo(wait=attempt == 1)
            total = int(sizes.sum())
            if len(sizes) > 64 and self.bump + total <= self.nwords:  # a bulk write: contiguous
                self.bump += total
                return self.bump - total + np.cumsum(sizes) - sizes
            taken: list[int] = []
            for n in sizes.tolist():
                first = self._alloc_one(n)
                if first is None:
                    for t, m in zip(taken, sizes.tolist(), strict=False):
                        self.free.setdefault(m, deque()).appendleft(t)
                    break
                taken.append(first)
            else:
                return np.array(taken, np.int64)
        raise DirFull(f"IPv4 DIR FIB's compressed root full ({self.nwords * 8 >> 20} MiB of blocks)")

    # --- writing -------------------------------------------------------------------
    def update(self, root: np.ndarray, chunks: np.ndarray) -> None:
        """Rewrite these /16s from the root: new blocks first, then the top stores."""
        if len(chunks) == 1:
            self.update_one(root, int(chunks[0]))
            return
        chunks = np.asarray(chunks, np.int64)
        rows = root.reshape(self.ntop, self.SLOTS)[chunks]
        starts = np.empty(rows.shape, bool)
        starts[:, 0] = True
        np.not_equal(rows[:, 1:], rows[:, :-1], out=starts[:, 1:])
        nruns = starts.sum(axis=1)
        blocked = (nruns > 1) | ((rows[:, 0] & EXT) != 0)  # a group's pointer is never a /16's only entry
        new_top = rows[:, 0].copy()
        new_words = np.zeros(len(chunks), np.int64)
        if blocked.any():
            st, nr = starts[blocked], nruns[blocked]
            sizes = self._size(nr)
            first = self._alloc(sizes)
            k = len(first)
            self.words[first[:, None] + np.arange(4)] = np.packbits(st, axis=1, bitorder="little").view("<u8")
            before = np.cumsum(st.reshape(k, 4, 64).sum(axis=2), axis=1).astype(np.uint32)
            self.u32[first * 2 + 8] = (before[:, 0] << 8) | (before[:, 1] << 16) | (before[:, 2] << 24)
            offsets = np.arange(int(nr.sum())) - np.repeat(np.cumsum(nr) - nr, nr)
            self.u32[np.repeat(first * 2 + lo.DIR_BLOCK_HEAD // 4, nr) + offsets] = rows[blocked][st]
            new_top[blocked] = EXT | first.astype(np.uint32)
            new_words[blocked] = sizes
        self._switch(chunks, new_top, new_words)

    def update_one(self, root: np.ndarray, chunk: int) -> None:
        """update() for one /16, as a single route change makes: the same steps
        in plain Python where numpy's per-call cost would dominate."""
        row = root[chunk * self.SLOTS:(chunk + 1) * self.SLOTS]
        starts = self._starts_scratch
        np.not_equal(row[1:], row[:-1], out=starts[1:])
        runs = row.compress(starts)
        n = len(runs)
        old = int(self.top[chunk])
        if n == 1 and not runs[0] & EXT:
            self.top[chunk] = runs[0]
            self._retire(chunk, old, 0)
            return
        bits = np.packbits(starts, bitorder="little").tobytes()
        size = (lo.DIR_BLOCK_HEAD + 4 * n + 7) // 8
        if old & EXT:
            first = old & ~int(EXT)
            head = first * 2 + lo.DIR_BLOCK_HEAD // 4
            if self.block_words[chunk] == size and self.blocks_mm[first * 8:first * 8 + 32] == bits:
                # same runs, new entries (a route replaced): one aligned 32-bit store each
                changed = np.flatnonzero(self.u32[head:head + n] != runs)
                self.u32[head + changed] = runs[changed]
                return
        first = self._alloc_one_block(size)
        v = int.from_bytes(bits, "little")
        c0, c1, c2 = (((v >> (64 * i)) & 0xFFFFFFFFFFFFFFFF).bit_count() for i in range(3))
        rank = (c0 << 8) | ((c0 + c1) << 16) | ((c0 + c1 + c2) << 24)
        # not yet visible: plain copies
        self.blocks_mm[first * 8:first * 8 + 36 + 4 * n] = bits + rank.to_bytes(4, "little") + runs.tobytes()
        self.top[chunk] = int(EXT) | first  # the switch
        self._retire(chunk, old, size)

    def _alloc_one_block(self, size: int) -> int:
        self._release_limbo()
        first = self._alloc_one(size)
        if first is None:
            self._release_limbo(wait=True)
            first = self._alloc_one(size)
            if first is None:
                raise DirFull(f"IPv4 DIR FIB's compressed root full ({self.nwords * 8 >> 20} MiB of blocks)")
        return first

    def _retire(self, chunk: int, old_top: int, new_words: int) -> None:
        if old_top & EXT:
            self.limbo.append((time.monotonic(), old_top & ~int(EXT), int(self.block_words[chunk])))
        self.block_words[chunk] = new_words

    def _switch(self, chunks: np.ndarray, new_top: np.ndarray, new_words: np.ndarray) -> None:
        """Point the /16s at their new entry or block; their old blocks go to limbo."""
        old = self.top[chunks]
        self.top[chunks] = new_top  # the switch: one aligned 32-bit store per /16
        for chunk, old_top, n in zip(chunks.tolist(), old.tolist(), new_words.tolist(), strict=True):
            self._retire(chunk, old_top, n)


class DirTable:
    """One family's DIR FIB (IPv4: DIR-24-8; IPv6: up to 13 levels)."""

    def __init__(self, root_map, groups_map, leaves_map, root_leaf_map, group_leaf_map, width: int,
                 recover: bool = True, compressed: CompressedRoot | None = None):
        """root_map: the root the data plane reads, or None with `compressed`:
        then the root lives here and the data plane reads its compressed form."""
        self.width = width
        self.compressed = compressed
        self._recovered = recover
        self._dirty: list[tuple[int, int]] = []  # root ranges changed since the compressed root was written
        self._mmaps = [m.mmap() for m in (groups_map, leaves_map, root_leaf_map, group_leaf_map)]
        n_root = 1 << ROOT_BITS
        self.ngroups = groups_map.max_entries
        self.nleaves = leaves_map.max_entries
        words = leaves_map.info.value_size // 8
        if compressed is None:
            self._mmaps.append(root_map.mmap())
            self.root = np.frombuffer(self._mmaps[-1], np.uint32, n_root)
        else:
            self.root = compressed.expand() if recover else np.zeros(n_root, np.uint32)
        self.groups = np.frombuffer(self._mmaps[0], np.uint32, self.ngroups * 256).reshape(self.ngroups, 256)
        self.leaves = np.frombuffer(self._mmaps[1], np.uint64, self.nleaves * words).reshape(self.nleaves, words)
        self.root_leaf = np.frombuffer(self._mmaps[2], np.uint32, n_root)
        self.group_leaf = np.frombuffer(self._mmaps[3], np.uint32, self.ngroups * 256).reshape(self.ngroups, 256)
        self.root_depth = np.zeros(n_root, np.uint8)
        self.group_depth = np.zeros((self.ngroups, 256), np.uint8)
        self.rules: dict[tuple[int, int], int] = {}  # (address as int, length) -> leaf
        self.free_groups: deque[int] = deque()
        self.free_leaves: deque[int] = deque()
        if recover:
            self._recover()

    def close(self) -> None:
        self.root = self.groups = self.leaves = self.root_leaf = self.group_leaf = None  # type: ignore[assignment]
        for m in self._mmaps:
            m.close()
        if self.compressed is not None:
            self.compressed.close()

    def _flush(self) -> None:
        """Write the /16s the last change touched to the compressed root."""
        if self.compressed is None or not self._dirty:
            self._dirty.clear()  # IPv6: the data plane reads the root itself
            return
        shift = ROOT_BITS - lo.DIR_TOP_BITS
        if len(self._dirty) == 1:
            start, stop = self._dirty[0]
            first, last = start >> shift, (stop - 1) >> shift
            self._dirty.clear()
            if first == last:  # a single route change: the common case
                self.compressed.update_one(self.root, first)
                return
            chunks = np.arange(first, last + 1)
        else:
            chunks = np.unique(np.concatenate([np.arange(a >> shift, ((b - 1) >> shift) + 1)
                                               for a, b in self._dirty]))
        self._dirty.clear()
        self.compressed.update(self.root, chunks)

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
            raise DirFull(f"IPv{4 if self.width == 32 else 6} DIR FIB full: {self.nleaves - 1} routes")
        return self.free_leaves.popleft()

    def _new_group(self, entry: int, leaf: int, depth: int) -> int:
        if not self.free_groups:
            raise DirFull(f"IPv{4 if self.width == 32 else 6} DIR FIB out of groups ({self.ngroups - 1}); "
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
        if len(arr) == 1:  # a prefix of the level's own length (a /24 at the root): scalars are faster
            e = int(arr[0])
            if e & EXT:
                self._apply_groups(np.array([e & ~int(EXT)]), entry, leaf, new_depth, length, deleting)
            elif (depth[0] == length) if deleting else (depth[0] <= length):
                depth[0], larr[0], arr[0] = new_depth, leaf, entry
            return
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
            self._dirty.append((sl.start, sl.stop))
            return self.root[sl], self.root_leaf[sl], self.root_depth[sl], []
        self._dirty.append((self._top(addr), self._top(addr) + 1))  # a group made or folded there
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

    def set_key(self, addr: int, length: int, word: int, version: int | None = None) -> None:
        try:
            self._set_key(addr, length, word)
        finally:
            self._flush()

    def _set_key(self, addr: int, length: int, word: int) -> None:
        entry = entry_of(word)
        leaf = self.rules.get((addr, length))
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
        self.rules[(addr, length)] = leaf
        self._apply(arr, larr, depth, entry, leaf, length, length, deleting=False)

    def delete(self, pk: tuple[int, int, int]) -> bool:
        """Remove the prefix with key (version, address as int, length)."""
        try:
            return self._delete(pk)
        finally:
            self._flush()

    def _delete(self, pk: tuple[int, int, int]) -> bool:
        _, addr, length = pk
        leaf = self.rules.pop((addr, length), None)
        if leaf is None:
            return False
        parent_leaf, parent_len = self._parent(addr, length)
        arr, larr, depth, path = self._range(addr, length, create=False)
        if arr is not None:
            self._apply(arr, larr, depth, self._entry(parent_leaf), parent_leaf, parent_len, length,
                        deleting=True)
        self._collapse(addr, path)
        self.leaves[leaf, 0] = 0
        self.free_leaves.append(leaf)
        return True

    def _parent(self, addr: int, length: int) -> tuple[int, int]:
        for plen in range(length - 1, -1, -1):
            masked = addr & ~((1 << (self.width - plen)) - 1) if plen else 0
            leaf = self.rules.get((masked, plen))
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

    def set_many(self, fresh: list[tuple[int, int, int]], version: int | None = None) -> None:
        """Bulk insert of (address as int, length, route word). Prefixes up to the
        root length are written vectorized, shortest first, so longer ones land on
        top; the rest go one by one."""
        try:
            self._set_many(fresh)
        finally:
            self._flush()

    def _set_many(self, fresh: list[tuple[int, int, int]]) -> None:
        if len(fresh) <= 16:  # numpy's per-call overhead outweighs vectorizing
            for a, ln, w in fresh:
                self._set_key(a, ln, w)
            return
        rules = self.rules
        short_keys, short_words, long_ = [], [], []
        for a, ln, w in fresh:
            k = (a, ln)
            if k in rules:  # a new route for a known prefix rewrites its entries
                self._set_key(a, ln, w)
            elif ln <= ROOT_BITS:
                short_keys.append(k)
                short_words.append(w)
            else:
                long_.append((a, ln, w))
        if len(short_keys) + len(long_) > len(self.free_leaves):
            raise DirFull(f"IPv{4 if self.width == 32 else 6} DIR FIB full: {self.nleaves - 1} routes")
        if short_keys:
            n = len(short_keys)
            shift = self.width - ROOT_BITS
            if self.width == 32:
                full = np.fromiter((k[0] for k in short_keys), np.uint32, n)
                addrs = (full >> np.uint32(shift)).astype(np.int64)
                # the leaf stores the address in network order, zero-padded
                addr_words = np.zeros((n, self.leaves.shape[1] - 1), np.uint64)
                addr_words[:, 0] = full.astype(">u4").view(np.uint32)
            else:
                addrs = np.fromiter((k[0] >> shift for k in short_keys), np.int64, n)
                addr_words = np.frombuffer(b"".join(k[0].to_bytes(16, "big") for k in short_keys),
                                           np.uint64).reshape(n, 2)
            lens = np.fromiter((k[1] for k in short_keys), np.int64, n)
            words = np.array(short_words, np.uint64)
            entries = entries_of(words)
            popleft = self.free_leaves.popleft
            leaves = np.array([popleft() for _ in range(n)], np.int64)
            self.leaves[leaves, 1:] = addr_words
            self.leaves[leaves, 0] = words
            rules.update(zip(short_keys, leaves.tolist()))
            for length in np.unique(lens).tolist():
                sel = lens == length
                span = 1 << (ROOT_BITS - length)
                starts = addrs[sel] & ~(span - 1)
                self._dirty.extend(zip(starts.tolist(), (starts + span).tolist(), strict=True))
                pos = (starts[:, None] + np.arange(span)).ravel()
                lv = np.repeat(leaves[sel], span).astype(np.uint32)
                ev = np.repeat(entries[sel], span)
                cur = self.root[pos]
                ext = (cur & EXT) != 0
                hit = ~ext & (self.root_depth[pos] <= length)
                self.root_depth[pos[hit]] = length
                self.root_leaf[pos[hit]] = lv[hit]
                self.root[pos[hit]] = ev[hit]
                for gid, entry, leaf in zip((cur[ext] & ~EXT).tolist(), ev[ext].tolist(), lv[ext].tolist(),
                                            strict=True):
                    self._apply_groups(np.array([gid]), entry, leaf, length, length, deleting=False)
        for a, ln, w in long_:
            self._set_key(a, ln, w)

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
            self.rules[(int.from_bytes(raw, "big"), int(plen[leaf]))] = leaf
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
        nbytes = sum(a.nbytes for a in (self.groups, self.leaves, self.root_leaf, self.group_leaf))
        if self.compressed is None:
            root, root_bytes, out = self.root, self.root.nbytes, {"bytes": int(nbytes + self.root.nbytes)}
        else:  # the root is here, in Python memory; the kernel holds its compressed form
            # (decoding the blocks costs a second at a full table: only without a recovered root)
            root = self.root if self._recovered else self.compressed.live_entries()
            c = self.compressed.memory()
            root_bytes = c["forwarding_bytes"]
            out = {"bytes": int(nbytes + c["bytes"]), "root_blocks": c["blocks"]}
        groups = self._reachable_groups(root[(root & EXT) != 0] & ~EXT)
        # what forwarding reads: the root (or its compressed form) and the groups in use
        return {"impl": "dir", **out, "forwarding_bytes": int(root_bytes + groups * self.groups.shape[1] * 4),
                "routes": self.count(), "groups_used": groups, "groups_total": self.ngroups - 1,
                "routes_total": self.nleaves - 1}

    def _reachable_groups(self, gids: np.ndarray) -> int:
        total = 0
        gids = np.unique(gids)
        while len(gids):
            total += len(gids)
            block = self.groups[gids]
            gids = np.unique(block[(block & EXT) != 0] & ~EXT)
        return total
