"""grace.GracePeriods: a real RCU grace period, from the kernel's synchronize_rcu
behind a map-in-map update (not a sleep)."""
import time

from bpfrouter.grace import GracePeriods


def test_wait_is_a_map_in_map_update_that_blocks_for_a_grace_period():
    grace = GracePeriods()
    tag = grace.mark()
    assert not grace.passed(tag)
    grace.wait(tag)
    assert grace.passed(tag) and grace.completed == 1
    grace.wait(tag)  # passed already: no second update
    assert grace.completed == 1
    # synchronize_rcu takes at least a scheduler tick; a plain syscall a few microseconds
    t0 = time.perf_counter_ns()
    grace.wait()
    assert time.perf_counter_ns() - t0 > 100_000
    assert grace.completed == 2
