"""The FIB writers' free-id ring (dirfib.FreeList): first in, first out, in bulk or one at a time."""
import numpy as np
import pytest

from bpfrouter.dirfib import FreeList


def test_ids_come_back_oldest_first_across_the_ring_end():
    free = FreeList(8, range(1, 8))
    assert free.take(5).tolist() == [1, 2, 3, 4, 5]
    free.extend([5, 3, 1])  # wraps past the ring's end
    assert len(free) == 5
    assert [free.popleft() for _ in range(3)] == [6, 7, 5]
    assert free.tolist() == [3, 1]


def test_an_id_given_back_unused_is_next():
    free = FreeList(4, [1, 2, 3])
    leaf = free.popleft()
    free.appendleft(leaf)
    assert free.popleft() == leaf
    free.append(9)
    assert free.tolist() == [2, 3, 9]


def test_bulk_and_single_agree():
    a, b = FreeList(100, np.arange(1, 100)), FreeList(100, np.arange(1, 100))
    assert a.take(40).tolist() == [b.popleft() for _ in range(40)]
    a.extend(np.arange(1, 41)[::-1])
    for i in range(40, 0, -1):
        b.append(i)
    assert a.tolist() == b.tolist()


def test_empty_pop_is_an_error():
    with pytest.raises(IndexError):
        FreeList(2).popleft()
