"""Hash-threshold bucket tables (bpfrouter/ecmp.py): shares by weight, and
the least movement when a group's members change, over random groups."""
import random

from bpfrouter.ecmp import HTHR_BUCKETS, fill_table, hash_fields, quotas


def test_quotas_share_by_weight_within_one_bucket():
    rng = random.Random(1)
    for _ in range(500):
        weights = [rng.randint(1, 255) for _ in range(rng.randint(1, 32))]
        q = quotas(weights, HTHR_BUCKETS)
        assert sum(q) == HTHR_BUCKETS
        assert all(abs(x - HTHR_BUCKETS * w / sum(weights)) < 1 for x, w in zip(q, weights, strict=True))


def test_tables_keep_every_bucket_they_can():
    rng = random.Random(2)
    for _ in range(300):
        pool = [f"gw{i}" for i in range(40)]
        old = [(h, rng.randint(1, 4)) for h in rng.sample(pool, rng.randint(1, 16))]
        table = fill_table(old, HTHR_BUCKETS)
        assert {h: table.count(h) for h in dict(old)} == dict(zip(dict(old), quotas([w for _, w in old],
                                                                                     HTHR_BUCKETS), strict=True))
        # a random change: members leave, come, change weight
        new = [(h, rng.randint(1, 4) if rng.random() < 0.2 else w) for h, w in old if rng.random() > 0.3]
        new += [(h, rng.randint(1, 4)) for h in rng.sample([p for p in pool if p not in dict(old)], rng.randint(0, 3))]
        if not new:
            continue
        after = fill_table(new, HTHR_BUCKETS, table)
        share = dict(zip(dict(new), quotas([w for _, w in new], HTHR_BUCKETS), strict=True))
        assert {h: after.count(h) for h in share} == share
        # a bucket moves only if its member left or was above its new share
        kept = {h: 0 for h in share}
        for a, b in zip(table, after, strict=True):
            if a == b:
                kept[a] += 1
        for h in share:
            assert kept[h] == min(share[h], table.count(h)), h


def test_policies_select_the_kernels_fields():
    assert hash_fields(4, 0, 0) == 0x3 and hash_fields(6, 0, 0) == 0xF
    assert hash_fields(4, 1, 0) == hash_fields(6, 1, 0) == 0x37
    assert hash_fields(4, 3, 0x30) == 0x30
