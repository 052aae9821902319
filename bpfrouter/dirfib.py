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
  - freed leaves and groups are reused last (FIFO), groups (which packets
    read) only after a real RCU grace period (grace.py).
"""
from __future__ import annotations

import heapq
import ipaddress
from collections import deque
from operator import itemgetter

import numpy as np

from .datapath import layout as lo
from .grace import GRACE, GracePeriods
from .routespec import IPNetwork

EXT = np.uint32(lo.DIR_EXT)
RAW = np.uint32(lo.DIR_TOP_RAW)  # in a top entry with EXT: the block's runs are entries, not ids
FIRST_MASK = np.uint32(lo.DIR_TOP_RAW - 1)  # in a top entry with EXT: the block's first word
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
    block: a 256-bit map of where runs of equal entries start, then each run's
    entry as an 8-bit id into run_entries, 8-byte aligned. About 3 MiB at a
    full table, where the root itself is 64 MiB: small enough to stay in the
    caches. A raw block holds 32-bit entries instead of ids: one that names a
    group (each group's pointer is named once) or an entry without an id.

    DirTable keeps the root in Python memory and hands the /16s it changed to
    update(), which writes each a new block into free space before the top
    store that switches to it (one aligned 32-bit store).

    Space is two halves used in turn. Blocks are taken from the active half
    by a bump pointer, and a replaced block is garbage. When the half is
    full, every live block is copied, in one vectorized pass, to the start of
    the other half, and each /16's top switched to its copy; the half left
    behind is written again only at the next compaction, and only after an
    RCU grace period since it was left (grace.py: a packet reads a /16's top
    and block inside one read-side section). Free space never fragments: a
    sync that grows blocks batch by batch only compacts more often.

    Ids: a route's entry (type and next hop) gets one the first time a block
    names it, while any of the 255 is free, and its run_entries slot is
    written before that block. After a compaction, the ids no live block
    names are freed, and reused only after a grace period (a packet may
    still read a replaced block)."""

    SLOTS = 1 << (ROOT_BITS - lo.DIR_TOP_BITS)  # root entries per /16

    def __init__(self, top_map, blocks_map, run_entries_map, writer: bool = True):
        """writer: the agent's (it may move blocks when it starts); readers,
        such as `bpfrouter status`, never write."""
        self.writer = writer
        self._mmaps = [m.mmap() for m in (top_map, blocks_map, run_entries_map)]
        self.ntop = top_map.max_entries * lo.DIR_CHUNK
        nbytes = blocks_map.info.value_size - lo.DIR_BLOCK_SLACK
        self.nwords = nbytes // 8
        self.top = np.frombuffer(self._mmaps[0], np.uint32, self.ntop)
        self.words = np.frombuffer(self._mmaps[1], np.uint64, self.nwords)
        self.u8 = np.frombuffer(self._mmaps[1], np.uint8, nbytes)
        self.u32 = np.frombuffer(self._mmaps[1], np.uint32, nbytes // 4)
        self.blocks_mm = self._mmaps[1]
        self.run_entries = np.frombuffer(self._mmaps[2], np.uint32, lo.DIR_RUN_IDS)
        self._collect_due = False                # a compaction left ids only garbage names
        self._starts_scratch = np.ones(self.SLOTS, bool)  # [0] stays True: a /16's first entry starts a run
        self.block_words = np.zeros(self.ntop, np.int64)  # per /16: its block's size (0: none)
        self.half = self.nwords // 2  # words per half
        self.base = 0                 # first word of the active half
        self.bump = 0                 # the active half's words from here on are free
        # per half, the grace tag of when a compaction last left it (unknown at start: now)
        self.left_tag = {0: GRACE.mark(), self.half: GRACE.mark()}
        self.compactions = 0
        self.ids: dict[int, int] = {0: 0}  # root entry -> its id; id 0 is entry 0 (no route)
        self._known = np.zeros(1, np.uint32)     # the same, sorted by entry, for numpy lookups
        self._known_ids = np.zeros(1, np.int64)
        self._free_ids: list[int] = list(range(1, lo.DIR_RUN_IDS))  # a heap: free now
        self._pending_ids: deque[tuple[int, int]] = deque()  # (grace tag, id): freed, not yet free
        self._recover()

    def close(self) -> None:
        self.top = self.words = self.u8 = self.u32 = self.blocks_mm = None  # type: ignore[assignment]
        self.run_entries = None  # type: ignore[assignment]
        for m in self._mmaps:
            m.close()

    def _full(self) -> DirFull:
        return DirFull(f"IPv4 DIR FIB's compressed root full ({self.half * 8 >> 20} MiB of blocks live)")

    @staticmethod
    def _size(runs, raw):
        """A block's size in 8-byte words."""
        return (lo.DIR_BLOCK_HEAD + (runs << 2 * raw) + 7) // 8

    # --- reading -----------------------------------------------------------
    def blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The /16s with a block, each block's first word, and whether it is raw."""
        chunks = np.nonzero((self.top & EXT) != 0)[0]
        t = self.top[chunks]
        return chunks, (t & FIRST_MASK).astype(np.int64), (t & RAW) != 0

    def _starts(self, first: np.ndarray) -> np.ndarray:
        """(k, 256) bools: where runs start in the blocks at these words."""
        raw = np.ascontiguousarray(self.words[first[:, None] + np.arange(4)]).view(np.uint8)
        return np.unpackbits(raw, axis=1, bitorder="little").astype(bool)

    def _read_runs(self, first: np.ndarray, raw: np.ndarray, run: np.ndarray) -> np.ndarray:
        """Root entries of runs: blocks' first words and rawness, run numbers (same shapes)."""
        pos = first * 8 + lo.DIR_BLOCK_HEAD
        as_raw = self.u32[np.minimum((pos + 4 * run) >> 2, len(self.u32) - 1)]  # (read for every run)
        return np.where(raw, as_raw, self.run_entries[self.u8[pos + run]])

    def _narrow_ids(self) -> np.ndarray:
        """The ids the live blocks name (each once)."""
        _, first, raw = self.blocks()
        first = first[~raw]
        n = self._starts(first).sum(axis=1)
        return np.unique(self.u8[np.repeat(first * 8 + lo.DIR_BLOCK_HEAD, n) + _offsets(n)])

    def expand(self) -> np.ndarray:
        """The 24-bit root the maps hold (for a restarted agent)."""
        root = np.empty((self.ntop, self.SLOTS), np.uint32)
        ext = (self.top & EXT) != 0
        root[~ext] = self.top[~ext][:, None]
        chunks, first, raw = self.blocks()
        if len(chunks):
            run = np.cumsum(self._starts(first), axis=1) - 1
            root[chunks] = self._read_runs(first[:, None], raw[:, None], run)
        return root.ravel()

    def live_entries(self) -> np.ndarray:
        """The root entries of every run in use (each run once: no decoding to 256 per /16)."""
        chunks, first, raw = self.blocks()
        n = self._starts(first).sum(axis=1)
        return self._read_runs(np.repeat(first, n), np.repeat(raw, n), _offsets(n))

    def memory(self) -> dict[str, int]:
        chunks, _, _ = self.blocks()
        used = int(self.block_words[chunks].sum()) * 8
        return {"bytes": int(self.top.nbytes + self.words.nbytes + self.run_entries.nbytes),
                "forwarding_bytes": int(self.top.nbytes + used + self.run_entries.nbytes),
                "blocks": int(len(chunks)), "run_ids": len(self.ids) - 1, "compactions": self.compactions}

    # --- run ids -------------------------------------------------------------------
    def _index_ids(self) -> None:
        entries = np.fromiter(self.ids.keys(), np.uint32, len(self.ids))
        order = np.argsort(entries)
        self._known = entries[order]
        self._known_ids = np.fromiter(self.ids.values(), np.int64, len(self.ids))[order]

    def _ids_for(self, entries: np.ndarray) -> np.ndarray:
        """The ids of these root entries (-1: none, a group's pointer or no
        id free), new ones taken and written as needed."""
        if self._collect_due:
            self._collect_ids()
        pos = np.searchsorted(self._known, entries)
        np.minimum(pos, len(self._known) - 1, out=pos)
        hit = self._known[pos] == entries
        missing = ~hit & ((entries & EXT) == 0)
        if missing.any() and self._new_ids(np.unique(entries[missing]).tolist()):
            return self._ids_for(entries)
        return np.where(hit, self._known_ids[pos], -1)

    def _new_ids(self, entries: list[int]) -> bool:
        """Ids for some of these entries, while any is free: whether any was taken."""
        pending = self._pending_ids
        if pending and len(self._free_ids) < len(entries):
            GRACE.wait(pending[-1][0])  # rather than blocks of raw entries
        while pending and GRACE.passed(pending[0][0]):
            heapq.heappush(self._free_ids, pending.popleft()[1])
        taken = False
        for e in entries[:len(self._free_ids)]:
            i = heapq.heappop(self._free_ids)
            self.run_entries[i] = e  # before a block names it
            self.ids[e] = i
            taken = True
        if taken:
            self._index_ids()
        return taken

    def _collect_ids(self) -> None:
        """Free the ids no live block names (garbage may: reused after a grace period)."""
        self._collect_due = False
        live = set(self._narrow_ids().tolist()) | {0}
        ready = GRACE.mark()
        for e, i in list(self.ids.items()):
            if i not in live:
                del self.ids[e]
                self._pending_ids.append((ready, i))
        self._index_ids()

    # --- space ---------------------------------------------------------------------
    def _recover(self) -> None:
        chunks, first, raw = self.blocks()
        if not len(chunks):
            return
        self.block_words[chunks] = self._size(self._starts(first).sum(axis=1), raw.astype(np.int64))
        live = self._narrow_ids().tolist()
        for i in live:
            self.ids.setdefault(int(self.run_entries[i]), i)
        self._free_ids = sorted(set(range(1, lo.DIR_RUN_IDS)) - set(live))  # sorted: a heap
        self._index_ids()
        upper = first >= self.half
        # the half with more live words is the active one; blocks in the other
        # (an agent stopped during a compaction) are moved over at once
        self.base = self.half if self.block_words[chunks][upper].sum() > self.block_words[chunks][~upper].sum() else 0
        mine = upper if self.base else ~upper
        self.bump = int((first[mine] + self.block_words[chunks][mine]).max()) if mine.any() else self.base
        if not mine.all() and self.writer:  # (a reader may see the agent's compaction half done)
            self.left_tag[self.half - self.base] = GRACE.mark()
            self._move_to_bump(chunks[~mine])

    def _move_to_bump(self, chunks: np.ndarray) -> None:
        sizes = self.block_words[chunks]
        if self.bump + int(sizes.sum()) > self.base + self.half:
            raise self._full()
        new_first = self.bump + np.cumsum(sizes) - sizes
        self.bump += int(sizes.sum())
        self._move(chunks, new_first)

    def _move(self, chunks: np.ndarray, new_first: np.ndarray) -> None:
        """Copy blocks, then switch their /16s to the copies."""
        top = self.top[chunks]
        old_first = (top & FIRST_MASK).astype(np.int64)
        sizes = self.block_words[chunks]
        offsets = _offsets(sizes)
        self.words[np.repeat(new_first, sizes) + offsets] = self.words[np.repeat(old_first, sizes) + offsets]
        self.top[chunks] = (top & (EXT | RAW)) | new_first.astype(np.uint32)  # one aligned 32-bit store per /16

    def _compact(self) -> None:
        """Every live block to the start of the other half, which no packet has
        read since a grace period."""
        other = self.half - self.base
        GRACE.wait(self.left_tag[other])
        chunks, first, _ = self.blocks()
        order = np.argsort(first)  # kept in address order: the copies stream
        chunks = chunks[order]
        sizes = self.block_words[chunks]
        self.base, self.bump = other, other
        self._move(chunks, other + np.cumsum(sizes) - sizes)
        self.bump = other + int(sizes.sum())
        self.left_tag[self.half - other] = GRACE.mark()  # after the switch: from now on no packet enters it
        self.compactions += 1
        self._collect_due = True  # at the next update: this one's new blocks may name ids no live one does

    def _alloc(self, total: int) -> int:
        """The first of `total` contiguous free words, or DirFull."""
        if self.bump + total > self.base + self.half:
            self._compact()
            if self.bump + total > self.base + self.half:
                raise self._full()
        self.bump += total
        return self.bump - total

    # --- writing -------------------------------------------------------------------
    def update(self, root: np.ndarray, chunks: np.ndarray) -> None:
        """Rewrite these /16s (sorted, each once) from the root: ids and new
        blocks first, then the top stores."""
        if len(chunks) == 1:
            self.update_one(root, int(chunks[0]))
            return
        chunks = np.asarray(chunks, np.int64)
        lo_chunk, hi_chunk = int(chunks[0]), int(chunks[-1])
        if hi_chunk - lo_chunk + 1 == len(chunks):  # a range (a full load: all): a view, not a 64 MiB copy
            rows = root.reshape(self.ntop, self.SLOTS)[lo_chunk:hi_chunk + 1]
        else:
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
            entries = rows[starts & blocked[:, None]]  # the blocked rows' runs, row by row
            ids = self._ids_for(entries)
            raw = np.minimum.reduceat(ids, np.cumsum(nr) - nr) < 0
            sizes = self._size(nr, raw.astype(np.int64))
            first = self._alloc(int(sizes.sum())) + np.cumsum(sizes) - sizes
            k = len(first)
            self.words[first[:, None] + np.arange(4)] = np.packbits(st, axis=1, bitorder="little").view("<u8")
            before = np.cumsum(st.reshape(k, 4, 64).sum(axis=2), axis=1).astype(np.uint32)
            self.u32[first * 2 + 8] = (before[:, 0] << 8) | (before[:, 1] << 16) | (before[:, 2] << 24)
            r = np.repeat(raw, nr)
            pos = np.repeat(first * 8 + lo.DIR_BLOCK_HEAD, nr) + (_offsets(nr) << 2 * r)
            self.u8[pos[~r]] = ids[~r]
            self.u32[pos[r] >> 2] = entries[r]
            new_top[blocked] = EXT | (RAW * raw) | first.astype(np.uint32)
            new_words[blocked] = sizes
        self.top[chunks] = new_top  # the switch: one aligned 32-bit store per /16
        self.block_words[chunks] = new_words

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
            self.block_words[chunk] = 0
            return
        entries = runs.tolist()
        ids = list(map(self.ids.get, entries))
        raw = int(None in ids)  # a group's pointer, or an entry without an id yet
        if raw and (self._collect_due or any(i is None and not e & lo.DIR_EXT for i, e in zip(ids, entries))):
            ids = self._ids_for(runs).tolist()
            raw = int(-1 in ids)
        bits = np.packbits(starts, bitorder="little").tobytes()
        body = runs.tobytes() if raw else bytes(ids)
        size = self._size(n, raw)
        if old & EXT and (old & int(RAW)) == raw * int(RAW):
            first = old & int(FIRST_MASK)
            if self.block_words[chunk] == size and self.blocks_mm[first * 8:first * 8 + 32] == bits:
                # same runs: new entries (a route replaced) are stored in place, one store each
                head = first * 8 + lo.DIR_BLOCK_HEAD
                if self.blocks_mm[head:head + len(body)] != body:
                    view, values = (self.u32, entries) if raw else (self.u8, ids)
                    head >>= 2 * raw
                    for i, (was, now) in enumerate(zip(view[head:head + n].tolist(), values)):
                        if was != now:
                            view[head + i] = now
                return
        first = self._alloc(size)
        v = int.from_bytes(bits, "little")
        word = 0xFFFFFFFFFFFFFFFF
        c0, c1, c2 = (v & word).bit_count(), ((v >> 64) & word).bit_count(), ((v >> 128) & word).bit_count()
        rank = (c0 << 8) | ((c0 + c1) << 16) | ((c0 + c1 + c2) << 24)
        # not yet visible: plain copies
        self.blocks_mm[first * 8:first * 8 + 36 + len(body)] = bits + rank.to_bytes(4, "little") + body
        self.top[chunk] = int(EXT) | raw * int(RAW) | first  # the switch
        self.block_words[chunk] = size


class FreeList:
    """Free ids, reused first in, first out, in a numpy ring: a bulk load takes
    a million at array speed, where a deque pops them one at a time.

    With `grace`, ids given back by release() (packets may still read what
    they name) join the ring only once a grace period has passed since; a
    taker that finds too few ready waits for one. len() counts them too."""

    def __init__(self, capacity: int, ids=(), grace: GracePeriods | None = None):
        self._ring = np.zeros(capacity, np.int64)
        self._head = 0
        self._count = 0
        self._grace = grace
        self._pending: deque[tuple[int, list[int]]] = deque()  # (grace tag, ids), oldest first
        self._npending = 0
        self.extend(ids)

    def __len__(self) -> int:
        return self._count + self._npending

    def release(self, ids) -> None:
        """Ids no table names any more: free after a grace period (at once without grace)."""
        ids = [int(i) for i in np.asarray(ids, np.int64).ravel().tolist()] if not isinstance(ids, list) else ids
        if not ids:
            return
        if self._grace is None:
            self.extend(ids)
            return
        self._pending.append((self._grace.mark(), ids))
        self._npending += len(ids)

    def _ready(self, n: int) -> None:
        """Move released ids whose grace period passed into the ring; wait for
        one if fewer than n would be ready."""
        pending = self._pending
        if not pending:
            return
        if self._count < n:
            self._grace.wait(pending[-1][0])
        while pending and self._grace.passed(pending[0][0]):
            _, ids = pending.popleft()
            self._npending -= len(ids)
            self.extend(ids)

    def _positions(self, start: int, n: int) -> np.ndarray:
        return (start + np.arange(n)) % len(self._ring)

    def extend(self, ids) -> None:
        """To the back. Each id is free once, so the ring never overflows."""
        if len(ids) == 1:  # a single change: numpy's per-call overhead would dominate
            self.append(int(ids[0]))
            return
        ids = np.asarray(ids, np.int64).ravel()
        self._ring[self._positions(self._head + self._count, len(ids))] = ids
        self._count += len(ids)

    def append(self, i: int) -> None:
        self._ring[(self._head + self._count) % len(self._ring)] = i
        self._count += 1

    def appendleft(self, i: int) -> None:
        """Back to the front: an id taken and not used after all."""
        self._head = (self._head - 1) % len(self._ring)
        self._ring[self._head] = i
        self._count += 1

    def popleft(self) -> int:
        self._ready(1)
        if not self._count:
            raise IndexError("no free id")
        i = int(self._ring[self._head])
        self._head = (self._head + 1) % len(self._ring)
        self._count -= 1
        return i

    def take(self, n: int) -> np.ndarray:
        """The n oldest free ids (the caller checked there are n)."""
        self._ready(n)
        out = self._ring[self._positions(self._head, n)]
        self._head = (self._head + n) % len(self._ring)
        self._count -= n
        return out

    def tolist(self) -> list[int]:
        """Every free id, released ones waiting for their grace period last."""
        return self._ring[self._positions(self._head, self._count)].tolist() + \
            [i for _, ids in self._pending for i in ids]


def _offsets(counts: np.ndarray) -> np.ndarray:
    """0..counts[i]-1 for each i, concatenated."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


class LeafTable:
    """A family's leaves (each route's word and prefix, in the leaves map)
    and the rules naming them: what the DIR FIB and the IPv6 hash levels
    share. A leaf is written before any entry names it, and freed (word 0)
    after none does; freed leaves are reused last (FIFO)."""

    def __init__(self, leaves_map, width: int):
        self.width = width
        self.version = 4 if width == 32 else 6
        ones = (1 << width) - 1
        self._masks = [ones ^ ((1 << (width - plen)) - 1) for plen in range(width + 1)]  # per prefix length
        self._leaves_mmap = leaves_map.mmap()
        self.nleaves = leaves_map.max_entries
        words = leaves_map.info.value_size // 8
        self.leaves = np.frombuffer(self._leaves_mmap, np.uint64, self.nleaves * words).reshape(self.nleaves, words)
        # (version, address as int, length) -> leaf: the Fib's own prefix keys,
        # so a bulk load adds no tuple per route
        self.rules: dict[tuple[int, int, int], int] = {}
        self.free_leaves = FreeList(self.nleaves)

    def close(self) -> None:
        self.leaves = None  # type: ignore[assignment]
        self._leaves_mmap.close()

    def _network(self, addr: int, length: int) -> IPNetwork:
        cls = ipaddress.IPv4Network if self.width == 32 else ipaddress.IPv6Network
        return cls((addr, length))

    def _entry(self, leaf: int) -> int:
        """The table entry of a leaf's route: type and next-hop id (0: no route)."""
        return entry_of(int(self.leaves[leaf, 0])) if leaf else 0

    def _full(self) -> DirFull:
        return DirFull(f"IPv{self.version} DIR FIB full: {self.nleaves - 1} routes")

    def _alloc_leaf(self) -> int:
        if not self.free_leaves:
            raise self._full()
        return self.free_leaves.popleft()

    def _write_leaf(self, leaf: int, addr: int, word: int) -> None:
        """A free leaf, which no entry names yet: plain bytes into the map."""
        row = self.leaves.shape[1] * 8
        self._leaves_mmap[leaf * row:(leaf + 1) * row] = \
            word.to_bytes(8, "little") + addr.to_bytes(self.width // 8, "big").ljust(row - 8, b"\0")

    def _free_leaves(self, leaves: list[int]) -> None:
        """After no entry names them any more."""
        if len(leaves) == 1:  # a single withdrawal: no fancy indexing
            self.leaves[leaves[0], 0] = 0
        else:
            self.leaves[leaves, 0] = 0
        self.free_leaves.extend(leaves)

    def _parent(self, addr: int, length: int, shortest: int = 0) -> tuple[int, int]:
        """The leaf and length of the longest rule covering a prefix, no shorter
        than `shortest` ((0, 0): none)."""
        rules, version, masks = self.rules, self.version, self._masks
        for plen in range(length - 1, shortest - 1, -1):
            leaf = rules.get((version, addr & masks[plen], plen))
            if leaf is not None:
                return leaf, plen
        return 0, 0

    def _recover_rules(self) -> np.ndarray:
        """Rules and free leaves from the leaves map; returns each leaf's prefix length."""
        words = self.leaves[:, 0]
        plen = _plen_of(words)
        live = np.nonzero(words)[0]
        for leaf in live.tolist():
            raw = self.leaves[leaf, 1:].tobytes()[: self.width // 8]
            self.rules[(self.version, int.from_bytes(raw, "big"), int(plen[leaf]))] = leaf
        used = np.zeros(self.nleaves, bool)
        used[live] = True
        used[0] = True
        self.free_leaves = FreeList(self.nleaves, np.nonzero(~used)[0])
        return plen

    def set(self, prefix: IPNetwork, value: lo.RouteValue) -> None:
        self.set_key(int(prefix.network_address), prefix.prefixlen, route_word(value))

    def installed(self) -> list[tuple[IPNetwork, lo.RouteValue]]:
        live = np.nonzero(self.leaves[:, 0])[0]
        out = []
        for leaf in live.tolist():
            value = word_route(int(self.leaves[leaf, 0]))
            raw = self.leaves[leaf, 1:].tobytes()[: self.width // 8]
            out.append((self._network(int.from_bytes(raw, "big"), value.prefixlen), value))
        return out

    def installed_fields(self) -> tuple[list[tuple[int, int, int]], list[int], list[int], list[int]]:
        """What a restarted agent reads back, without an object per route: the
        prefix keys and, in the same order, next-hop ids, route types and
        protocols (from the recovered rules, read as arrays)."""
        pks = list(self.rules)
        words = self.leaves[np.fromiter(self.rules.values(), np.int64, len(pks)), 0]
        return (pks, (words & np.uint64(0xFFFFFFFF)).tolist(), ((words >> np.uint64(32)) & np.uint64(0xFF)).tolist(),
                ((words >> np.uint64(48)) & np.uint64(0xFF)).tolist())

    def count(self) -> int:
        return int(np.count_nonzero(self.leaves[:, 0]))


class DirTable(LeafTable):
    """IPv4's DIR FIB: DIR-24-8 (IPv6 uses hashfib6.HashTable6)."""

    def __init__(self, groups_map, leaves_map, root_leaf_map, group_leaf_map, compressed: CompressedRoot,
                 recover: bool = True):
        """The 24-bit root lives here, in Python memory; the data plane reads
        its compressed form."""
        super().__init__(leaves_map, 32)
        self.compressed = compressed
        self._recovered = recover
        # root ranges, and arrays of /16s, changed since the compressed root was written
        self._dirty: list[tuple[int, int]] = []
        self._dirty_chunks: list[np.ndarray] = []
        self._mmaps = [m.mmap() for m in (groups_map, root_leaf_map, group_leaf_map)]
        n_root = 1 << ROOT_BITS
        self.ngroups = groups_map.max_entries
        self.root = compressed.expand() if recover else np.zeros(n_root, np.uint32)
        self.groups = np.frombuffer(self._mmaps[0], np.uint32, self.ngroups * 256).reshape(self.ngroups, 256)
        self.root_leaf = np.frombuffer(self._mmaps[1], np.uint32, n_root)
        self.group_leaf = np.frombuffer(self._mmaps[2], np.uint32, self.ngroups * 256).reshape(self.ngroups, 256)
        self.root_depth = np.zeros(n_root, np.uint8)
        self.group_depth = np.zeros((self.ngroups, 256), np.uint8)
        self.free_groups = FreeList(self.ngroups, grace=GRACE)
        self._unlinked_groups: list[int] = []  # freed by this change: released after its flush
        if recover:
            self._recover()

    def close(self) -> None:
        self.root = self.groups = self.root_leaf = self.group_leaf = None  # type: ignore[assignment]
        for m in self._mmaps:
            m.close()
        super().close()
        self.compressed.close()

    def _mark_rows(self, rows: np.ndarray, span: int) -> None:
        """Root rows of `span` entries changed (a bulk write)."""
        shift = ROOT_BITS - lo.DIR_TOP_BITS
        per = max(1, span >> shift)
        self._dirty_chunks.append(((rows * span) >> shift)[:, None] + np.arange(per))

    def _flush(self) -> None:
        """Write the /16s the last change touched to the compressed root; then
        the groups it unlinked start their grace period."""
        unlinked, self._unlinked_groups = self._unlinked_groups, []
        self._flush_root()  # (if it fails, packets may still reach them: never reused)
        if unlinked:
            self.free_groups.release(unlinked)

    def _flush_root(self) -> None:
        if not (self._dirty or self._dirty_chunks):
            return
        shift = ROOT_BITS - lo.DIR_TOP_BITS
        if len(self._dirty) == 1 and not self._dirty_chunks:
            start, stop = self._dirty[0]
            first, last = start >> shift, (stop - 1) >> shift
            self._dirty.clear()
            if first == last:  # a single route change: the common case
                self.compressed.update_one(self.root, first)
                return
            chunks = np.arange(first, last + 1)
        else:
            parts = [np.arange(a >> shift, ((b - 1) >> shift) + 1) for a, b in self._dirty]
            chunks = np.unique(np.concatenate(parts + [c.ravel() for c in self._dirty_chunks]))
        self._dirty.clear()
        self._dirty_chunks.clear()
        self.compressed.update(self.root, chunks)

    # --- helpers ----------------------------------------------------------------
    def _top(self, addr: int) -> int:
        return addr >> (self.width - ROOT_BITS)

    def _new_group(self, entry: int, leaf: int, depth: int) -> int:
        if not self.free_groups:
            raise DirFull(f"IPv{self.version} DIR FIB out of groups ({self.ngroups - 1}); "
                          f"raise --fib-groups")
        g = self.free_groups.popleft()
        self.group_depth[g] = depth
        self.group_leaf[g] = leaf
        self.groups[g] = entry  # filled before anything points to it
        return g

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
        # few numpy calls: at one route per event, their fixed cost is most of the work
        ext = arr >= EXT
        hit = (depth == length) if deleting else (depth <= length)
        gids = arr[ext] & ~EXT if ext.any() else None  # groups below: routes longer than the level
        if gids is not None:
            hit &= ~ext
        depth[hit] = new_depth
        larr[hit] = leaf
        arr[hit] = entry
        if gids is not None:
            self._apply_groups(gids, entry, leaf, new_depth, length, deleting)

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
        """The group below the root on the way to a prefix longer than the root,
        and the address's byte in it: [(group, byte)] ([] when there is none and
        create is False). IPv4 has one group level: /25 to /32."""
        idx = self._top(addr)
        e = self.root[idx]
        if e & EXT:
            g = int(e & ~EXT)
        elif not create:
            return []
        else:
            g = self._new_group(int(e), int(self.root_leaf[idx]), int(self.root_depth[idx]))
            self.root[idx] = EXT | np.uint32(g)
        return [(g, addr & 0xFF)]

    def _range(self, addr: int, length: int, create: bool):
        """(entries, leaves, depths) views covered by the prefix at its own level, and the path."""
        if length <= ROOT_BITS:
            start = self._top(addr) & ~((1 << (ROOT_BITS - length)) - 1)
            sl = slice(start, start + (1 << (ROOT_BITS - length)))
            self._dirty.append((sl.start, sl.stop))
            return self.root[sl], self.root_leaf[sl], self.root_depth[sl], []
        self._dirty.append((self._top(addr), self._top(addr) + 1))  # a group made or folded there
        path = self._path(addr, length, create)
        if not path:
            return None, None, None, path
        g, byte = path[0]
        span = 1 << (ROOT_BITS + 8 - length)
        sl = slice(byte & ~(span - 1), (byte & ~(span - 1)) + span)
        return self.groups[g, sl], self.group_leaf[g, sl], self.group_depth[g, sl], path

    # --- public ------------------------------------------------------------------------
    def set_key(self, addr: int, length: int, word: int) -> None:
        try:
            self._set_key(addr, length, word)
        finally:
            self._flush()

    def _set_key(self, addr: int, length: int, word: int) -> None:
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
        try:
            return self._delete(pk)
        finally:
            self._flush()

    def _delete(self, pk: tuple[int, int, int]) -> bool:
        leaf = self.rules.pop(pk, None)
        if leaf is None:
            return False
        self._unset(pk[1], pk[2])
        self._free_leaves([leaf])
        return True

    def _root_parent(self, addr: int, length: int) -> tuple[int, int] | None:
        """_parent for a prefix of /1 to /24, read from the root instead of up to
        24 dict probes. The other half of the /(L-1) around the prefix (its
        sibling) is covered by the same shorter rules; an entry there set by a
        rule shorter than L was set by the longest of them. None when every
        sibling entry belongs to a longer rule or a group. (In a batch, shorter
        prefixes are unset first, so those entries are current.)"""
        span = 1 << (ROOT_BITS - length)
        i = (self._top(addr) & ~(span - 1)) ^ span  # the sibling's first entry: most often enough
        d = int(self.root_depth[i])
        if d >= length or int(self.root[i]) & lo.DIR_EXT:
            if span == 1:
                return None
            depth = np.where(self.root[i:i + span] >= EXT, 255, self.root_depth[i:i + span])
            i += int(depth.argmin())
            d = int(self.root_depth[i])
            if d >= length or int(self.root[i]) & lo.DIR_EXT:
                return None
        return int(self.root_leaf[i]), d

    def _unset(self, addr: int, length: int) -> None:
        """Give a removed prefix's entries to its longest covering prefix that stays."""
        found = self._root_parent(addr, length) if 0 < length <= ROOT_BITS else None
        parent_leaf, parent_len = found if found is not None else self._parent(addr, length)
        arr, larr, depth, path = self._range(addr, length, create=False)
        if arr is not None:
            self._apply(arr, larr, depth, self._entry(parent_leaf), parent_leaf, parent_len, length,
                        deleting=True)
        self._collapse(addr, path)

    def delete_many(self, pks: list[tuple[int, int, int]]) -> None:
        """Bulk removal (unknown prefixes are skipped): a withdrawn peer's table
        goes at array speed. Each removed prefix's entries go to its longest
        covering prefix that stays, so the order is free: shorter ones go first,
        so that groups below them are uniform, and fold, when the longer go."""
        try:
            self._delete_many(pks)
        finally:
            self._flush()

    def _delete_many(self, pks: list[tuple[int, int, int]]) -> None:
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
        tops = np.fromiter((pk[1] >> shift for pk in pks), np.int64, n)
        lens = np.fromiter(map(itemgetter(2), pks), np.int64, n)
        self._apply_rows(tops, lens, p_entry, p_leaf, p_len, deleting=True)

    def _apply_rows(self, tops: np.ndarray, lens: np.ndarray, entries: np.ndarray, leaves: np.ndarray,
                    new_depths: np.ndarray, deleting: bool) -> None:
        """_apply for many prefixes no longer than the root (their root indices,
        lengths, and what each writes), vectorized: the root is seen as rows of
        one prefix's span, so a prefix of length L is one row."""
        # no group anywhere and nothing longer than these prefixes (a load into an
        # empty table): every entry they cover is theirs, shortest first, unread
        paint = (not deleting and len(self.free_groups) == self.ngroups - 1
                 and int(self.root_depth.max()) <= int(lens.min()))
        for length in np.unique(lens).tolist():
            sel = np.nonzero(lens == length)[0]
            span = 1 << (ROOT_BITS - length)
            rows = tops[sel] >> (ROOT_BITS - length)
            order = np.argsort(rows)  # in address order, the rows' reads and stores stream
            rows, sel = rows[order], sel[order]
            root, depth, leaf = (a.reshape(-1, span) for a in (self.root, self.root_depth, self.root_leaf))
            self._mark_rows(rows, span)
            ev, lv, dv = entries[sel][:, None], leaves[sel][:, None], new_depths[sel][:, None]
            if paint:
                depth[rows], leaf[rows], root[rows] = dv, lv, ev
                continue
            cur, cur_depth = root[rows], depth[rows]
            ext = (cur & EXT) != 0
            hit = ~ext & ((cur_depth == length) if deleting else (cur_depth <= length))
            depth[rows] = np.where(hit, dv, cur_depth)
            leaf[rows] = np.where(hit, lv, leaf[rows])
            # whole rows are stored back: entries not hit get their own value again
            root[rows] = np.where(hit, ev, cur)
            if ext.any():
                r, c = np.nonzero(ext)
                for gid, entry, lf, d in zip((cur[r, c] & ~EXT).tolist(), ev[r, 0].tolist(), lv[r, 0].tolist(),
                                             dv[r, 0].tolist(), strict=True):
                    self._apply_groups(np.array([gid]), entry, lf, d, length, deleting)

    def _clear(self) -> None:
        """No route left: every entry becomes 0 (a packet sees its old entry or
        none), and every group goes to the back of the free list."""
        self.root[:] = 0
        self._dirty.append((0, len(self.root)))
        self.root_leaf[:] = 0
        self.root_depth[:] = 0
        free = np.zeros(self.ngroups, bool)
        free[0] = True
        free[self.free_groups.tolist() + self._unlinked_groups] = True
        self._unlinked_groups.extend(np.nonzero(~free)[0].tolist())

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
            self._unlinked_groups.append(g)

    def set_many(self, pks: list[tuple[int, int, int]], words) -> None:
        """Bulk insert: prefix keys (version, address as int, length) and their
        route words (a list, or a uint64 array). New prefixes up to the root
        length are written vectorized, shortest first, so longer ones land on
        top; the rest go one by one."""
        try:
            self._set_many(pks, words)
        finally:
            self._flush()

    def _set_many(self, pks: list[tuple[int, int, int]], words) -> None:
        if len(pks) <= 16:  # numpy's per-call overhead outweighs vectorizing
            for pk, w in zip(pks, words, strict=True):
                self._set_key(pk[1], pk[2], int(w))
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
            raise self._full()
        for pk, w in rewrites:
            self._set_key(pk[1], pk[2], w)
        if not n:
            return
        lens = _plen_of(words).astype(np.int64)  # a route word holds its prefix length
        short = lens <= ROOT_BITS
        long_ = np.nonzero(~short)[0].tolist()
        if len(long_) < n:
            if long_:
                sel = np.nonzero(short)[0]
                self._set_short([pks[i] for i in sel.tolist()], lens[sel], words[sel])
            else:
                self._set_short(pks, lens, words)
        for i in long_:
            self._set_key(pks[i][1], pks[i][2], int(words[i]))

    def _set_short(self, pks: list, lens: np.ndarray, words: np.ndarray) -> None:
        """New prefixes no longer than the root, vectorized."""
        n = len(pks)
        full = np.fromiter(map(itemgetter(1), pks), np.uint32, n)
        tops = (full >> np.uint32(self.width - ROOT_BITS)).astype(np.int64)
        # the leaf stores the address in network order, zero-padded
        addr_words = np.zeros((n, self.leaves.shape[1] - 1), np.uint64)
        addr_words[:, 0] = full.astype(">u4").view(np.uint32)
        entries = entries_of(words)
        leaves = self.free_leaves.take(n)
        self.leaves[leaves, 1:] = addr_words
        self.leaves[leaves, 0] = words
        self.rules.update(zip(pks, leaves.tolist()))
        self._apply_rows(tops, lens, entries, leaves.astype(np.uint32), lens.astype(np.uint8), deleting=False)

    def _recover(self) -> None:
        """Rebuild the Python side (rules, depths, free lists) from the maps."""
        plen = self._recover_rules()
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
        self.free_groups = FreeList(self.ngroups, np.nonzero(~in_use)[0], grace=GRACE)

    def memory(self) -> dict[str, int]:
        """Bytes the structure holds in the kernel, what forwarding reads of
        them, and how full it is."""
        nbytes = sum(a.nbytes for a in (self.groups, self.leaves, self.root_leaf, self.group_leaf))
        # the root is here, in Python memory; the kernel holds its compressed form
        # (decoding the blocks costs a second at a full table: only without a recovered root)
        root = self.root if self._recovered else self.compressed.live_entries()
        c = self.compressed.memory()
        root_bytes = c["forwarding_bytes"]
        out = {"bytes": int(nbytes + c["bytes"]), "root_blocks": c["blocks"], "root_run_ids": c["run_ids"],
               "compactions": c["compactions"]}
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
