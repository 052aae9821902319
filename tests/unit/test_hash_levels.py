"""Which prefix lengths get a hash level (bpfrouter/hashfib6.py), and the
vectorized bucket hash against the scalar one (the data plane's answers
check the scalar one: tests/dataplane/test_hashfib6.py)."""
import itertools

import numpy as np

from bpfrouter.hashfib6 import buckets_np, buckets_of, choose_levels


def stored_keys(counts: np.ndarray, levels: list[int]) -> float:
    """Keys a table stores with these levels: each prefix expanded to the next level up."""
    total = 0.0
    for length in np.nonzero(counts)[0]:
        level = min(L for L in levels if L >= length)
        total += counts[length] * 2.0 ** (level - length)
    return total


def test_every_length_gets_a_level_when_they_fit():
    counts = np.zeros(129, np.int64)
    counts[[29, 32, 48, 64, 65, 128]] = [3, 100, 50, 2, 1, 7]
    assert choose_levels(counts) == [29, 32, 48, 64, 65, 128]


def test_past_the_limit_the_levels_store_the_fewest_keys():
    rng = np.random.default_rng(3)
    for _ in range(20):
        counts = np.zeros(129, np.int64)
        lengths = rng.choice(np.arange(20, 60), 8, replace=False)
        counts[lengths] = rng.integers(1, 1000, 8)
        used = sorted(lengths.tolist())
        got = choose_levels(counts, max_levels=4)
        assert len(got) <= 4 and got[-1] == used[-1] and set(got) <= set(used)
        best = min(stored_keys(counts, list(c) + [used[-1]]) for c in itertools.combinations(used[:-1], 3))
        assert stored_keys(counts, got) == best


def test_the_vectorized_hash_is_the_scalar_one():
    rng = np.random.default_rng(4)
    hi = rng.integers(0, 1 << 63, 1000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    lo = rng.integers(0, 1 << 63, 1000, dtype=np.uint64)
    for nb in (1, 7, 1 << 17):
        b1, b2, bit = buckets_np(hi, lo, nb)
        want = [buckets_of(h, low, nb) for h, low in zip(hi.tolist(), lo.tolist(), strict=True)]
        assert want == list(zip(b1.tolist(), b2.tolist(), bit.tolist(), strict=True))
        assert b1.max() < nb and b2.max() < nb and bit.max() < 64
