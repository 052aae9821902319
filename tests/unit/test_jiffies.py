"""The data plane's clock (jiffies) against CLOCK_MONOTONIC."""
import pytest

from bpfrouter.datapath.jiffies import JiffiesClock, JiffiesError, _sample, hz_from

TIMER_LIST = """Timer List Version: v0.10
HRTIMER_MAX_CLOCK_BASES: 8
now at 11130816436631 nsecs

cpu: 0
jiffies: 4297674937
"""


@pytest.mark.parametrize("hz", [100, 250, 300, 1000])
def test_hz_is_the_choice_whose_ticks_match_the_uptime(hz):
    uptime_ns = 11_130_816_436_631
    jiffies = (1 << 32) - 300 * hz + uptime_ns * hz // 1_000_000_000
    assert hz_from(jiffies, uptime_ns) == hz


def test_timer_list_sample_and_conversion():
    jiffies, mono = _sample(TIMER_LIST)
    assert (jiffies, mono) == (4297674937, 11130816436631)
    assert hz_from(jiffies, mono) == 250
    clock = JiffiesClock(jiffies, mono, 250)
    assert clock.monotonic(jiffies) == mono
    assert clock.monotonic(jiffies - 250) == mono - 1_000_000_000


def test_a_timer_list_without_jiffies_is_a_clear_error():
    with pytest.raises(JiffiesError, match="no 'now at' or 'jiffies:' line"):
        _sample("Timer List Version: v0.10\n")
