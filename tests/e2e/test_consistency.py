"""One writer, consistent state: a dump never undoes a newer event.

The agent runs a hook (BPFROUTER_SYNC_HOOK) at named points of a sync; here
it runs the shell script a test armed for that point, once, so the kernel
changes exactly there: after the sockets are bound and before any dump
("start"), or between a route dump and its apply ("routes-dumped"). Each
test then waits for a marker route it adds afterwards, so every earlier
event has been applied, and compares the data plane with the kernel."""
import ipaddress
import os
import random
import subprocess
import sys

import pytest

from bpfrouter import netns
from bpfrouter.agent.client import agent_pid, request
from tests.conftest import BPF_SKIP
from tests.kernelfib import KernelFib, dataplane_match

from .conftest import RouterProgram, _make, wait_for
from .test_link_state import dataplane_answer, kernel_answer, restore_r_eth1

HOOK = """#!/bin/sh
f="{dir}/$1"
[ -f "$f" ] || exit 0
mv "$f" "$f.ran" && exec sh "$f.ran"
"""


def start_agent_with_hook(r, tmp_path) -> None:
    hook = tmp_path / "hook"
    hook.write_text(HOOK.format(dir=tmp_path))
    hook.chmod(0o755)
    r.cli("agent", "stop")
    env = dict(os.environ, BPFROUTER_SYNC_HOOK=str(hook))
    subprocess.run([sys.executable, "-m", "bpfrouter", "agent", "start", "--name", r.name], env=env,
                   check=True, capture_output=True)


def applied_up_to_now(r) -> None:
    """Add a marker route and wait for the data plane to have it: every route
    event before it has been applied."""
    r.lab.run("r", ["ip", "route", "replace", "10.96.0.0/16", "via", "10.0.1.2"], check=True)
    assert wait_for(lambda: r.json("route", "get", "10.96.0.1")["route"]["prefix"] == "10.96.0.0/16",
                    timeout=15)


def test_start_does_not_replay_events_from_before_a_silent_flush(bpf_router, tmp_path):
    """Between the agent's socket binding and its first dump, a route via
    r-eth1 is added (an event queued) and r-eth1 set down (the kernel flushes
    the route without a notification; the link dump then sees it down, so no
    link change follows). Replaying the queued event after the dump brought
    the flushed route back into the mirror for good."""
    r, lab = bpf_router, bpf_router.lab
    lab.run("r", ["ip", "route", "add", "10.98.0.0/15", "via", "10.0.1.2", "dev", "r-eth0"], check=True)
    # No address goes with the link (its removal would ask for a route dump of
    # its own): IPv6's kept, the link-local one (never kept) removed beforehand.
    lab.run("r", ["ip", "-6", "addr", "flush", "dev", "r-eth1", "scope", "link"], check=True)
    (tmp_path / "start").write_text("sysctl -qw net.ipv6.conf.r-eth1.keep_addr_on_down=1\n"
                                    "ip route add 10.98.0.0/16 via 10.0.2.2 dev r-eth1\n"
                                    "ip link set r-eth1 down\n")
    try:
        start_agent_with_hook(r, tmp_path)
        assert (tmp_path / "start.ran").exists(), "the hook did not run; the test proves nothing"
        applied_up_to_now(r)
        assert kernel_answer(lab, "10.98.1.1") == ("r-eth0", "10.0.1.2"), "the kernel kept the route"
        assert dataplane_answer(r, "10.98.1.1") == ("r-eth0", "10.0.1.2")
    finally:
        lab.run("r", ["sysctl", "-qw", "net.ipv6.conf.r-eth1.keep_addr_on_down=0"])
        restore_r_eth1(lab)
        lab.run("r", ["ip", "route", "del", "10.98.0.0/15"])
        lab.run("r", ["ip", "route", "del", "10.96.0.0/16"])
        r.cli("agent", "stop")
        r.cli("agent", "start")


def test_events_between_a_resync_dump_and_its_apply_are_applied_after_it(bpf_router, tmp_path):
    """A resync asked for by the API: between its dump and its apply, one
    route is deleted, one added and one replaced. The dump holds none of
    these changes; the events that follow it must all win."""
    r, lab = bpf_router, bpf_router.lab
    run = lambda *cmd: lab.run("r", ["ip", "route", *cmd], check=True)  # noqa: E731
    run("add", "10.95.1.0/24", "via", "10.0.1.2")
    run("add", "10.95.3.0/24", "via", "10.0.1.2")
    (tmp_path / "routes-dumped").write_text("ip route del 10.95.1.0/24\n"
                                            "ip route add 10.95.2.0/24 via 10.0.2.2\n"
                                            "ip route replace 10.95.3.0/24 via 10.0.2.2\n")
    try:
        start_agent_with_hook(r, tmp_path)
        assert (tmp_path / "routes-dumped.ran").exists()  # at the start's dump
        (tmp_path / "routes-dumped.ran").rename(tmp_path / "routes-dumped")  # armed again
        run("replace", "10.95.1.0/24", "via", "10.0.1.2")
        run("del", "10.95.2.0/24")
        run("replace", "10.95.3.0/24", "via", "10.0.1.2")
        applied_up_to_now(r)
        request(r.name, "resync")
        assert (tmp_path / "routes-dumped.ran").exists(), "the hook did not run; the test proves nothing"
        applied_up_to_now(r)
        for dst in ("10.95.1.1", "10.95.2.1", "10.95.3.1"):
            assert dataplane_answer(r, dst) == kernel_answer(lab, dst), dst
        assert dataplane_answer(r, "10.95.3.1") == ("r-eth1", "10.0.2.2")
        assert agent_pid(r.name) is not None
    finally:
        for p in ("10.95.1.0/24", "10.95.2.0/24", "10.95.3.0/24", "10.96.0.0/16"):
            lab.run("r", ["ip", "route", "del", p])
        r.cli("agent", "stop")
        r.cli("agent", "start")


@pytest.fixture(scope="module")
def small_router():
    """A router whose IPv4 FIB has 7 groups (each /24 holding a route longer
    than /24 needs one); its local /32s take 4."""
    if BPF_SKIP:
        pytest.skip(BPF_SKIP)
    lr = _make("bpf", "f", "--fib-groups", "8,64")
    yield lr
    lr.lab.down()


class FastPath(RouterProgram):
    """The loaded program against the kernel (tests/kernelfib.py)."""

    def outcomes(self, dests) -> dict[str, str]:
        """Per destination: 'same' when the program finds the route the
        kernel finds, 'passed' when it finds none and passes the packet to the
        kernel; anything else fails."""
        with KernelFib(self.lab.router_ns) as k:
            want = k.match_many([ipaddress.ip_address(d) for d in dests])
        out = {}
        for dst, kernel in zip(dests, want, strict=True):
            with netns.entered(self.lab.router_ns):
                got = dataplane_match(self.dp, ipaddress.ip_address(dst), self.iif, self.mac)
            if got.kind == "none":
                out[dst] = "passed"
                continue
            assert kernel.agrees(got), f"{dst}: kernel {kernel}, fast path {got}"
            out[dst] = "same"
        return out


N_LONG = 8  # /25s in distinct /24s: 3 groups are free for them


def test_a_full_fib_leaves_out_what_does_not_fit_and_passes_its_traffic(small_router):
    r, lab = small_router, small_router.lab
    batch = ["route add 10.80.0.0/16 via 10.0.2.2", "route add 10.81.0.0/16 via 10.0.2.2"]
    batch += [f"route add 10.80.{i}.0/25 via 10.0.1.2" for i in range(N_LONG)]
    lab.run("r", ["ip", "-batch", "-"], input="\n".join(batch) + "\n", check=True)
    applied_up_to_now(r)
    full = r.json("status")["agent"]["fib_full"]
    assert full and full["left_out"] >= N_LONG - 3 and "groups" in full["error"], full
    assert full["withheld"] >= 1  # 10.80.0.0/16 at least

    # every probe forwarded exactly as the kernel would, or passed to it
    fp = FastPath(lab)
    try:
        rng = random.Random(7)
        dests = [f"10.80.{i}.{h}" for i in range(N_LONG) for h in (1, 200)] + [f"10.81.{i}.1" for i in range(N_LONG)]
        dests += [f"10.{rng.choice((0, 80, 81))}.{rng.randrange(256)}.{rng.randrange(256)}" for _ in range(300)]
        outcome = fp.outcomes(dests)
        assert all(outcome[f"10.81.{i}.1"] == "same" for i in range(N_LONG)), "routes covering none left out stay"
        assert any(outcome[f"10.80.{i}.1"] == "same" for i in range(N_LONG)), "what fits is installed"
        assert all(outcome[f"10.80.{i}.200"] == "passed" for i in range(N_LONG)), "the covering /16 is withheld"

        # the API: the kernel takes the route, the answer says so in one line
        proc = r.cli("route", "add", "10.80.50.0/25", "via", "10.0.1.2", check=False)
        assert proc.returncode != 0
        err = proc.stderr.strip()
        assert len(err.splitlines()) == 1 and "is in the kernel" in err and "passes its traffic to the kernel" in err, err
        assert "10.80.50.0/25" in lab.run("r", ["ip", "route", "show", "10.80.50.0/25"], check=True).stdout
        assert fp.outcomes(["10.80.50.1"]) == {"10.80.50.1": "passed"}

        # later events are still applied
        lab.run("r", ["ip", "route", "add", "10.82.0.0/16", "via", "10.0.1.2"], check=True)
        assert wait_for(lambda: fp.probe("10.82.0.1").prefix == "10.82.0.0/16", timeout=15)
        assert fp.outcomes(["10.82.0.1"]) == {"10.82.0.1": "same"}

        # room again: every route back in the fast path, as its routes change
        gone = [f"route del 10.80.{i}.0/25" for i in list(range(N_LONG)) + [50]]
        lab.run("r", ["ip", "-batch", "-"], input="\n".join(gone) + "\n", check=True)
        assert wait_for(lambda: fp.probe("10.80.5.1").prefix == "10.80.0.0/16", timeout=15)
        assert r.json("status")["agent"]["fib_full"] is None
        assert all(v == "same" for d, v in fp.outcomes(dests).items() if d.startswith(("10.80.", "10.81.")))
    finally:
        fp.close()
    for p in ("10.80.0.0/16", "10.81.0.0/16", "10.82.0.0/16", "10.96.0.0/16"):
        lab.run("r", ["ip", "route", "del", p])
