"""Maglev consistent hashing with weights (Eisenbud et al., NSDI 2016), as
Katran's second-generation fill does it.

Each backend has a permutation of the table's slots, from its offset and
skip, both hashed from the backend's address alone: the same service
definition gives the same table on every router. Backends take turns
claiming their next free slot; with weights, a backend's turn comes each
time its accumulated weight reaches the largest weight, so slots go in
the weights' proportions. The table size is a prime, so every skip walks
all slots."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

# Table sizes: primes, each about four times the last. A service's size is
# the first at least 100 times its backend count, unless the user sets one;
# it changes only when the backend count outgrows it (every flow may then move).
SIZES = (1021, 4093, 16381, 65521, 262139, 1048573)
MIN_PER_BACKEND = 100


class MaglevError(ValueError):
    pass


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def table_size(backends: int, current: int | None = None) -> int:
    """The table size for a backend count: the current one while it is
    still at least 100 times the count, else the first of SIZES that is."""
    need = MIN_PER_BACKEND * max(backends, 1)
    if current and current >= need:
        return current
    for s in SIZES:
        if s >= need:
            return max(s, current or 0)
    raise MaglevError(f"{backends} backends need a table of at least {need} slots; the largest is {SIZES[-1]}")


def check_size(size: int) -> int:
    if not is_prime(size) or not SIZES[0] <= size <= SIZES[-1]:
        raise MaglevError(f"table size {size} must be a prime between {SIZES[0]} and {SIZES[-1]}")
    return size


def _hash64(key: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, key=salt).digest(), "little")


def permutation(key: str, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend's walk over the table."""
    return _hash64(key, b"offset") % size, _hash64(key, b"skip") % (size - 1) + 1


@dataclass(frozen=True)
class Member:
    key: str            # what its permutation is hashed from: the backend's address
    weight: int         # > 0


def build(members: list[Member], size: int) -> list[int]:
    """The table: for each slot, the index of its member in `members`; -1
    everywhere when there is none."""
    table = [-1] * size
    # turns go in key order, so the table does not depend on the list's order
    live = sorted(((i, m) for i, m in enumerate(members) if m.weight > 0), key=lambda x: x[1].key)
    if not live:
        return table
    top = max(m.weight for _, m in live)
    walks = [(i, *permutation(m.key, size), m.weight) for i, m in live]
    nxt = [0] * len(walks)
    acc = [0] * len(walks)
    filled = 0
    while True:
        for w, (i, offset, skip, weight) in enumerate(walks):
            acc[w] += weight
            if acc[w] < top:
                continue
            acc[w] -= top
            n = nxt[w]
            cur = (offset + n * skip) % size
            while table[cur] >= 0:
                n += 1
                cur = (offset + n * skip) % size
            table[cur] = i
            nxt[w] = n + 1
            filled += 1
            if filled == size:
                return table


def shares(table: list[int], count: int) -> list[float]:
    """Each member's share of the table's slots."""
    n = [0] * count
    for i in table:
        if i >= 0:
            n[i] += 1
    return [x / len(table) for x in n]


def moved(old: list[str | None], new: list[str | None]) -> float:
    """The share of flows whose backend changed between two tables (by key);
    1.0 between tables of different sizes, where any flow may move."""
    if len(old) != len(new):
        return 1.0
    return sum(a != b for a, b in zip(old, new)) / len(new) if new else 0.0
