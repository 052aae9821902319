"""The kernel's tick counter, which the data plane reads as a clock
(bpf_jiffies64() is inlined to one load; the ktime helpers cost about 20 ns
a call on this kind of CPU), and its relation to CLOCK_MONOTONIC."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

TIMER_LIST = "/proc/timer_list"
HZ_CHOICES = (100, 250, 300, 1000)  # the kernel's CONFIG_HZ options
INITIAL_JIFFIES_SECONDS = 300  # jiffies start 300 s short of a 32-bit wrap (linux/jiffies.h)


class JiffiesError(Exception):
    """The tick counter could not be read."""


@dataclass(frozen=True)
class JiffiesClock:
    """jiffies and CLOCK_MONOTONIC read at one instant, and ticks per second."""
    jiffies: int
    monotonic_ns: int
    hz: int

    def monotonic(self, jiffies: int) -> int:
        """A jiffies value as CLOCK_MONOTONIC ns (tick resolution)."""
        return self.monotonic_ns - (self.jiffies - jiffies) * 1_000_000_000 // self.hz


def _sample(text: str | None = None) -> tuple[int, int]:
    if text is None:
        try:
            with open(TIMER_LIST) as f:
                # all of it: CPU 0's active timers come before its 'jiffies:' line
                text = f.read()
        except OSError as e:
            raise JiffiesError(f"cannot read {TIMER_LIST}: {e.strerror}") from None
    now = re.search(r"^now at (\d+) nsecs", text, re.M)
    jiffies = re.search(r"^jiffies: (\d+)", text, re.M)
    if not now or not jiffies:
        raise JiffiesError(f"{TIMER_LIST} has no 'now at' or 'jiffies:' line")
    return int(jiffies.group(1)), int(now.group(1))


def hz_from(jiffies: int, monotonic_ns: int) -> int:
    """CONFIG_HZ: the choice whose ticks since boot match the uptime."""
    def error(hz: int) -> float:
        ticks = (jiffies - ((1 << 32) - INITIAL_JIFFIES_SECONDS * hz)) % (1 << 64)
        return abs(ticks / hz - monotonic_ns / 1e9)
    return min(HZ_CHOICES, key=error)


@functools.cache
def kernel_hz() -> int:
    return hz_from(*_sample())


def now() -> JiffiesClock:
    jiffies, mono = _sample()
    return JiffiesClock(jiffies, mono, kernel_hz())
