"""`make demo`, the README's main command, run whole: every step it shows
succeeds, XDP forwards the traffic rather than the kernel, the service
answers every request through a backend's death, and the lab is gone
afterwards."""
from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_the_demo_runs_and_xdp_forwards_its_traffic():
    proc = subprocess.run([sys.executable, "-m", "bpfrouter.demo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    m = re.search(r"(\d+) packets were forwarded by XDP \(XDP_REDIRECT\); the router's kernel forwarded (\d+)", out)
    assert m, out[-3000:]
    xdp, kernel = int(m[1]), int(m[2])
    # two iperf runs: tens of thousands of packets; the kernel only sees each neighbor's first packets
    assert xdp > 10_000 and kernel < 20, (xdp, kernel)
    assert "drop blackhole" in out and "lab demo down" in out
    # the service: every request answered, by all three backends, then by the two left alive
    spread = re.findall(r"(\d+) of (\d+) requests answered: (.*)", out)
    assert len(spread) == 2 and all(a == b for a, b, _ in spread), spread
    assert spread[0][2].count(" ") == 5 and "b3" not in spread[1][2], spread
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not re.search(r"^demo-", left, re.M), left
