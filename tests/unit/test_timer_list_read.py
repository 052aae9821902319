"""The observers' clock read from the real /proc/timer_list on a busy CPU.

CPU 0's active high-resolution timers are listed before the first
'jiffies:' line, so with enough of them (every sleeping thread holds one)
that line is far from the start of the file: bpfrouter once read only the
first 4 KiB and `bpfrouter up` failed while other work ran on the host."""
import os
import threading

import pytest

from bpfrouter.datapath.jiffies import TIMER_LIST, _sample

SLEEPERS = 200


@pytest.mark.skipif(not os.access(TIMER_LIST, os.R_OK), reason=f"{TIMER_LIST} is readable by root only")
def test_jiffies_found_behind_many_active_timers():
    asleep, wake = threading.Barrier(SLEEPERS + 1), threading.Event()

    def sleeper():
        os.sched_setaffinity(threading.get_native_id(), {0})  # their timers on CPU 0, listed first
        asleep.wait()
        wake.wait(60)  # a futex wait with a timeout: one hrtimer each

    threads = [threading.Thread(target=sleeper) for _ in range(SLEEPERS)]
    for t in threads:
        t.start()
    try:
        asleep.wait()
        with open(TIMER_LIST) as f:
            text = f.read()
        assert text.index("\njiffies:") > 4096, "the setup did not push the line out of the first 4 KiB"
        jiffies, mono = _sample()
        assert (jiffies, mono) > (0, 0)
    finally:
        wake.set()
        for t in threads:
            t.join()
