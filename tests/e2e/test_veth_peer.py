"""Plain veth pairs, GRO off on the hosts' ends (the veth default): frames
redirected into such a port were dropped by the kernel while `status`
counted them as redirected (issue 21). `up` now turns GRO on at the peer,
in a named namespace or one only a process holds, and says so; it refuses a
peer whose namespace it cannot enter."""
import json
import os
import subprocess

import pytest

from bpfrouter import netns
from bpfrouter.datapath import PIN_ROOT
from bpfrouter.lab import Lab
from tests.conftest import bpfrouter_cmd
from .conftest import wait_for

from .test_errors import assert_one_line_error

PINGS = 20


def gro(lab: Lab, node: str, on: bool | None = None, ns_file: str | None = None) -> bool:
    """GRO of a host's veth, set first when `on` is given; ns_file: enter the
    host's namespace through this file instead of its name."""
    ifname = f"{node}-eth0"
    prefix = ["nsenter", f"--net={ns_file}"] if ns_file else lab.cmd(node, [])
    if on is not None:
        subprocess.run(prefix + ["ethtool", "-K", ifname, "gro", "on" if on else "off"], check=True)
    out = subprocess.run(prefix + ["ethtool", "-k", ifname], check=True, capture_output=True, text=True).stdout
    return "generic-receive-offload: on" in out


def icmp(lab: Lab, node: str, field: str) -> int:
    hdr, val = [line.split() for line in lab.run(node, ["cat", "/proc/net/snmp"], check=True).stdout.splitlines()
                if line.startswith("Icmp:")][:2]
    return int(val[hdr.index(field)])


def redirected(name: str, iface: str) -> int:
    st = json.loads(bpfrouter_cmd("status", "--name", name, "-j", check=True).stdout)
    return sum(c["packets"] for c in st["counters"] if c["iface"] == iface and c["verdict"] == "redirect")


def assert_pings_delivered_and_counted(lab: Lab) -> None:
    """PINGS pings h1 -> h2 all answered, and what XDP counts as redirected
    is exactly what arrived: requests at h2, replies at h1."""
    lab.run("h1", ["ping", "-c", "2", "-i", "0.2", "-W", "2", lab.addr("h2")])  # neighbors resolved
    before = {"fwd": redirected(lab.name, "r-eth0"), "back": redirected(lab.name, "r-eth1"),
              "echos": icmp(lab, "h2", "InEchos"), "replies": icmp(lab, "h1", "InEchoReps")}
    out = lab.run("h1", ["ping", "-c", str(PINGS), "-i", "0.05", "-W", "2", lab.addr("h2")]).stdout
    fwd, back = redirected(lab.name, "r-eth0") - before["fwd"], redirected(lab.name, "r-eth1") - before["back"]
    echos, replies = icmp(lab, "h2", "InEchos") - before["echos"], icmp(lab, "h1", "InEchoReps") - before["replies"]
    summary = next((line for line in out.splitlines() if "transmitted" in line), out)
    assert f"{PINGS} received" in out, f"{summary}; redirected {fwd} requests, {back} replies"
    assert (fwd, back) == (echos, replies) == (PINGS, PINGS), \
        f"redirected {fwd} requests and {back} replies; {echos} requests and {replies} replies arrived"


@pytest.fixture
def lab():
    lb = Lab(f"v{os.getpid() % 10000}")
    lb.up()
    yield lb
    lb.down()


def test_up_turns_peer_gro_on(lab):
    for host in ("h1", "h2"):
        assert not gro(lab, host, on=False)
    proc = bpfrouter_cmd("up", "r-eth0", "r-eth1", "--name", lab.name, netns=lab.router_ns)
    assert proc.returncode == 0, proc.stderr
    assert_pings_delivered_and_counted(lab)
    for port, host in (("r-eth0", "h1"), ("r-eth1", "h2")):
        assert (f"{port}: veth peer {host}-eth0 (netns {lab.ns(host)}) had GRO off; turned it on so redirected "
                f"frames are delivered") in proc.stdout.splitlines(), proc.stdout
        assert gro(lab, host)


def test_peer_in_unreachable_namespace(lab, tmp_path):
    """h1's namespace held only by a bind mount outside /run/netns and with no
    process in it: bpfrouter cannot enter it, so it cannot fix h1-eth0; it
    refuses before changing anything (h2-eth0 keeps GRO off), and accepts once
    the user has turned GRO on (the kernel then reports that the port takes
    redirected frames)."""
    ns_file = str(tmp_path / "h1-netns")
    open(ns_file, "w").close()
    subprocess.run(["mount", "--bind", netns.path(lab.ns("h1")), ns_file], check=True)
    try:
        subprocess.run(["ip", "netns", "delete", lab.ns("h1")], check=True)
        assert not gro(lab, "h1", on=False, ns_file=ns_file)
        assert not gro(lab, "h2", on=False)
        proc = bpfrouter_cmd("up", "r-eth0", "r-eth1", "--name", lab.name, netns=lab.router_ns)
        assert_one_line_error(proc, "r-eth0: veth peer h1-eth0", "cannot be entered",
                              "run `ethtool -K h1-eth0 gro on` in that namespace")
        assert not (PIN_ROOT / lab.name).exists(), "a refused up left pins behind"
        assert not gro(lab, "h2"), "a refused up changed another port's peer"

        gro(lab, "h1", on=True, ns_file=ns_file)
        proc = bpfrouter_cmd("up", "r-eth0", "r-eth1", "--name", lab.name, netns=lab.router_ns)
        assert proc.returncode == 0, proc.stderr
        assert [line for line in proc.stdout.splitlines() if "veth peer" in line] == [
            f"r-eth1: veth peer h2-eth0 (netns {lab.ns('h2')}) had GRO off; turned it on so redirected frames "
            f"are delivered"]
        # h1's name back, for the traffic (nothing in bpfrouter looks at it any more)
        open(netns.path(lab.ns("h1")), "w").close()
        subprocess.run(["mount", "--bind", ns_file, netns.path(lab.ns("h1"))], check=True)
        assert_pings_delivered_and_counted(lab)
    finally:
        bpfrouter_cmd("down", "--name", lab.name)
        subprocess.run(["umount", ns_file])


def test_peer_in_a_namespace_only_a_process_holds(lab):
    """h1's namespace without a name, kept by a process in it (a container's
    case): bpfrouter enters it through the process and turns GRO on."""
    holder = lab.popen("h1", ["sleep", "600"])
    try:
        ns_file = f"/proc/{holder.pid}/ns/net"  # nsenter execs sleep: same pid
        # until nsenter has entered h1's namespace, the pid is still in ours
        h1_ns = os.stat(netns.path(lab.ns("h1"))).st_ino
        assert wait_for(lambda: os.stat(ns_file).st_ino == h1_ns, timeout=10), "the holder never entered h1"
        subprocess.run(["ip", "netns", "delete", lab.ns("h1")], check=True)
        assert not gro(lab, "h1", on=False, ns_file=ns_file)
        proc = bpfrouter_cmd("up", "r-eth0", "r-eth1", "--name", lab.name, netns=lab.router_ns)
        assert proc.returncode == 0, proc.stderr
        assert (f"r-eth0: veth peer h1-eth0 (the network namespace of pid {holder.pid}) had GRO off; turned it on "
                f"so redirected frames are delivered") in proc.stdout.splitlines(), proc.stdout
        assert gro(lab, "h1", ns_file=ns_file)
        open(netns.path(lab.ns("h1")), "w").close()  # h1's name back, for the traffic
        subprocess.run(["mount", "--bind", ns_file, netns.path(lab.ns("h1"))], check=True)
        assert_pings_delivered_and_counted(lab)
    finally:
        bpfrouter_cmd("down", "--name", lab.name)
        holder.kill()
        holder.wait()
