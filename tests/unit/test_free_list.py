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


class CountingGrace:
    """grace.GracePeriods' interface, counting the grace periods it is asked for."""

    def __init__(self):
        self.completed = self.waits = 0

    def mark(self):
        return self.completed

    def passed(self, tag):
        return self.completed > tag

    def wait(self, tag=None):
        if tag is None or not self.passed(tag):
            self.completed += 1
            self.waits += 1


def test_released_ids_wait_for_a_grace_period_and_stay_in_order():
    grace = CountingGrace()
    free = FreeList(8, [1, 2], grace=grace)
    free.release([5])
    free.release(np.array([3, 4]))
    assert len(free) == 5 and free.tolist() == [1, 2, 5, 3, 4]
    assert free.take(2).tolist() == [1, 2] and grace.waits == 0  # ready ones: no wait
    assert free.popleft() == 5 and grace.waits == 1  # none ready: one grace period
    free.release([7])
    assert [free.popleft(), free.popleft()] == [3, 4] and grace.waits == 1  # passed already
    assert free.popleft() == 7 and grace.waits == 2


def test_a_released_id_is_not_reused_before_a_grace_period():
    grace = CountingGrace()
    free = FreeList(4, grace=grace)
    free.release([2])
    tag = grace.mark()
    assert free.popleft() == 2
    assert grace.passed(tag)
