"""The lab: two labs coexist; tear-down is reliable after an interrupted run."""
import os

from bpfrouter.lab import Lab, list_labs
from tests.conftest import bpfrouter_cmd


def test_two_labs_coexist_and_forward():
    a, b = Lab(f"la{os.getpid() % 10000}"), Lab(f"lb{os.getpid() % 10000}")
    try:
        a.up()
        b.up()
        assert {a.name, b.name} <= set(list_labs())
        for lab in (a, b):
            assert lab.run("h1", ["ping", "-c1", "-W2", lab.addr("h2")]).returncode == 0
            assert lab.run("h1", ["ping", "-c1", "-W2", lab.addr("h2", 6)]).returncode == 0
    finally:
        a.down()
        b.down()
    assert not a.exists() and not b.exists()


def test_down_after_interrupted_run_cleans_everything():
    lab = Lab(f"li{os.getpid() % 10000}")
    lab.up()
    bpfrouter_cmd("up", "r-eth0", "r-eth1", "--name", lab.name, netns=lab.router_ns, check=True)
    # a run that died half-way: a process left inside, a router still attached
    stray = lab.popen("h1", ["sleep", "600"])
    try:
        lab.up()  # `up` over leftovers rebuilds from scratch
        assert lab.run("h1", ["ping", "-c1", "-W2", lab.addr("h2")]).returncode == 0
        bpfrouter_cmd("up", "r-eth0", "--name", lab.name, netns=lab.router_ns, check=True)
        stray2 = lab.popen("h2", ["sleep", "600"])
        assert bpfrouter_cmd("lab", "down", "--lab", lab.name).returncode == 0
        assert stray2.wait(timeout=5) != 0 and stray.wait(timeout=5) != 0
        assert not lab.exists()
        assert bpfrouter_cmd("status", "--name", lab.name).returncode != 0
    finally:
        stray.kill()
        lab.down()
