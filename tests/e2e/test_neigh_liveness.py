"""Neighbor liveness (issue 21): the fast path stops using a next hop the
kernel would no longer use, within the kernel's own detection time, and
picks up a replaced one.

XDP traffic never reaches the kernel's neighbor code, so a STALE entry used
only by the fast path was used for ever. Now the fast path marks the
entries it uses and the agent replays that use to the kernel with NTF_USE
(bpfrouter/neighbors.py). The kernel then probes the next hop as its own
traffic would make it; a dead one goes FAILED and leaves the map, and its
packets are passed to the kernel (no_neigh), which answers with ICMP
unreachable as it does for any unresolvable next hop.

h2 (the next hop) receives a steady UDP flow from h1 through the router;
it never sends anything itself (a bound socket takes the datagrams, so no
ICMP port unreachable teaches the router h2's MAC behind the test's back).
The neighbor sysctls of the router's port are set small, and the bound is
derived from them: the entry's REACHABLE time (at most 1.5 x
base_reachable_time), delay_first_probe_time, ucast_solicit probes
retrans_time apart, plus one agent pass (POKE_SECONDS) and a slack for a
busy host."""
import ipaddress
import json
import os
import sys
import time

import pytest

from bpfrouter.datapath import Datapath
from bpfrouter.datapath import layout as lo
from bpfrouter.lab import Lab
from bpfrouter.neighbors import POKE_SECONDS, Neighbors, neigh_key
from bpfrouter.observe import read_counters
from tests.conftest import bpfrouter_cmd

from .conftest import wait_for

NEIGH_SYSCTLS = {"base_reachable_time_ms": 1000, "delay_first_probe_time": 1, "retrans_time_ms": 200,
                 "ucast_solicit": 2, "mcast_solicit": 2}
SLACK = 3.0
BOUND = (1.5 * NEIGH_SYSCTLS["base_reachable_time_ms"] / 1000 + NEIGH_SYSCTLS["delay_first_probe_time"]
         + NEIGH_SYSCTLS["ucast_solicit"] * NEIGH_SYSCTLS["retrans_time_ms"] / 1000 + POKE_SECONDS + SLACK)
PORT = 9999
USED_CHECK = 500  # > 5 s of the flow in the fast path
PACKETS = 60  # datagrams that must take the expected path in each phase (the sender sends one per 10 ms)

SENDER = """
import socket, sys, time
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
while True:
    try:
        s.sendto(b'x' * 64, (sys.argv[1], int(sys.argv[2])))
    except OSError:
        pass  # ICMP unreachable reported on the socket
    time.sleep(0.01)
"""
SINK = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    s.recv(2048)
"""


def udp_in(lab: Lab, node: str, version: int) -> int:
    if version == 4:
        hdr, val = [line.split() for line in lab.run(node, ["cat", "/proc/net/snmp"], check=True).stdout.splitlines()
                    if line.startswith("Udp:")][:2]
        return int(val[hdr.index("InDatagrams")])
    snmp6 = dict(line.split() for line in lab.run(node, ["cat", "/proc/net/snmp6"], check=True).stdout.splitlines())
    return int(snmp6["Udp6InDatagrams"])


def unreachables(lab: Lab, node: str, version: int) -> int:
    if version == 4:
        hdr, val = [line.split() for line in lab.run(node, ["cat", "/proc/net/snmp"], check=True).stdout.splitlines()
                    if line.startswith("Icmp:")][:2]
        return int(val[hdr.index("InDestUnreachs")])
    snmp6 = dict(line.split() for line in lab.run(node, ["cat", "/proc/net/snmp6"], check=True).stdout.splitlines())
    return int(snmp6["Icmp6InDestUnreachs"])


# --fib kernel: bpf_fib_lookup reads the kernel's own entries but does not
# mark them used either; the stage marks the mirrored entry it resolved to
@pytest.fixture(params=[(4, "bpf"), (6, "bpf"), (4, "kernel")], ids=["4", "6", "4-fib-kernel"])
def flow(request):
    version, fib = request.param
    lab = Lab(f"n{version}{fib[0]}{os.getpid() % 10000}")
    lab.up()
    fam = "ipv4" if version == 4 else "ipv6"
    for key, value in NEIGH_SYSCTLS.items():
        lab.run("r", ["sysctl", "-qw", f"net.{fam}.neigh.r-eth1.{key}={value}"], check=True)
    proc = bpfrouter_cmd("up", "r-eth0", "r-eth1", "--name", lab.name, "--fib", fib, netns=lab.router_ns)
    assert proc.returncode == 0, proc.stderr
    dst = lab.addr("h2", version)
    sink = lab.popen("h2", [sys.executable, "-c", SINK, dst, str(PORT)])
    sender = lab.popen("h1", [sys.executable, "-c", SENDER, dst, str(PORT)])
    dp = Datapath.open(lab.name)
    try:
        yield lab, version, dst, Neighbors(dp)
    finally:
        dp.close()
        for p in (sender, sink):
            p.kill()
            p.wait()
        bpfrouter_cmd("down", "--name", lab.name)
        lab.down()


def neigh_mac(nb: Neighbors, dst: str) -> bytes | None:
    return next((mac for _, addr, mac, _ in nb.entries() if str(addr) == dst), None)


def counter(nb: Neighbors, lab: Lab, reason: lo.Reason) -> int:
    """Packets from h1 (ingress r-eth0) the router decided on with this reason."""
    return read_counters(nb.dp).get((lab.link("r", "r-eth0")[0], reason), (0, 0))[0]


def fwd(nb: Neighbors, lab: Lab, version: int) -> int:
    return counter(nb, lab, lo.Reason.FWD_IPV4 if version == 4 else lo.Reason.FWD_IPV6)


def no_neigh(nb: Neighbors, lab: Lab) -> int:
    return counter(nb, lab, lo.Reason.PASS_NO_NEIGH)


def set_mac(lab: Lab, mac: str) -> None:
    lab.run("h2", ["ip", "link", "set", "h2-eth0", "address", mac], check=True)


def kernel_used_age(lab: Lab, dst: str) -> int:
    """Seconds since the router's kernel last saw its neighbor entry used
    (NDA_CACHEINFO, as `ip -s neigh` shows it)."""
    out = lab.run("r", ["ip", "-s", "-j", "neigh", "show", dst, "dev", "r-eth1"], check=True).stdout
    return json.loads(out)[0]["used"]


def test_next_hop_dies_returns_and_is_replaced(flow):
    lab, version, dst, nb = flow
    # The fast path carries the flow to h2, and the kernel sees the entry used.
    # Only the flow's first packet took the kernel path: without the replay,
    # after USED_CHECK packets (10 ms apart) the kernel's last use is that old.
    start = fwd(nb, lab, version)
    assert wait_for(lambda: fwd(nb, lab, version) >= start + USED_CHECK, timeout=60), "XDP never carried the flow"
    age = kernel_used_age(lab, dst)
    assert age <= POKE_SECONDS + 1, f"the kernel last saw {dst} used {age} s ago, while XDP forwards to it"
    assert neigh_mac(nb, dst) == lab.link("h2", "h2-eth0")[1]

    # h2 stops answering ARP/ND for its address: the kernel's probes fail
    t0 = time.monotonic()
    if version == 4:
        lab.run("h2", ["ip", "-4", "addr", "flush", "dev", "h2-eth0"], check=True)
    else:
        lab.run("h2", ["ip", "-6", "addr", "del", f"{dst}/64", "dev", "h2-eth0"], check=True)
    wait_for(lambda: neigh_mac(nb, dst) is None, timeout=BOUND + 5, interval=0.02)
    gone_after = time.monotonic() - t0
    assert neigh_mac(nb, dst) is None, f"the fast path still uses the dead next hop after {gone_after:.1f} s"
    assert gone_after <= BOUND, f"the fast path stopped using the dead next hop after {gone_after:.1f} s, " \
                                f"over the kernel's detection bound of {BOUND:.1f} s"
    # from then on the flow goes to the kernel, counted, and the kernel answers
    f0, p0, u0 = fwd(nb, lab, version), no_neigh(nb, lab), unreachables(lab, "h1", version)
    assert wait_for(lambda: no_neigh(nb, lab) >= p0 + PACKETS, timeout=30)
    assert fwd(nb, lab, version) == f0, "XDP forwarded to the dead next hop"
    assert wait_for(lambda: unreachables(lab, "h1", version) > u0, timeout=10), \
        "the kernel did not report the next hop unreachable"

    # h2 comes back with a new MAC: the kernel resolves it, the fast path follows
    new_mac = "02:00:00:00:02:01"
    set_mac(lab, new_mac)
    if version == 4:
        lab.run("h2", ["ip", "addr", "add", f"{dst}/24", "dev", "h2-eth0"], check=True)
    else:
        lab.run("h2", ["ip", "-6", "addr", "add", f"{dst}/64", "dev", "h2-eth0", "nodad"], check=True)
    assert wait_for(lambda: neigh_mac(nb, dst) == mac_bytes(new_mac), timeout=BOUND + 5), \
        f"the neighbor map holds {neigh_mac(nb, dst)} for the revived next hop"
    assert_flow_in_fast_path(lab, version, nb)

    # h2 takes another MAC while the fast path forwards to it (a replaced box on
    # the same address): the kernel's unicast probes to the old MAC fail, the
    # entry goes, the kernel resolves the new MAC and the fast path uses it
    new_mac = "02:00:00:00:02:02"
    t0 = time.monotonic()
    set_mac(lab, new_mac)
    wait_for(lambda: neigh_mac(nb, dst) == mac_bytes(new_mac), timeout=BOUND + 5, interval=0.02)
    took = time.monotonic() - t0
    assert neigh_mac(nb, dst) == mac_bytes(new_mac), \
        f"after {took:.1f} s the fast path still sends to {neigh_mac(nb, dst)}"
    resolve = NEIGH_SYSCTLS["mcast_solicit"] * NEIGH_SYSCTLS["retrans_time_ms"] / 1000
    assert took <= BOUND + resolve, \
        f"the new MAC was picked up after {took:.1f} s, over the bound of {BOUND + resolve:.1f} s"
    assert_flow_in_fast_path(lab, version, nb)


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def assert_flow_in_fast_path(lab: Lab, version: int, nb: Neighbors) -> None:
    f0, r0 = fwd(nb, lab, version), udp_in(lab, "h2", version)
    assert wait_for(lambda: fwd(nb, lab, version) >= f0 + PACKETS and udp_in(lab, "h2", version) >= r0 + PACKETS,
                    timeout=30), "the flow did not return to the fast path and to h2"


def test_replay_changes_only_what_traffic_would():
    """NTF_USE runs the kernel's admin update path: sent bare, it strips
    PERMANENT (the entry became INCOMPLETE) and clears extern_learn. The
    replay reads each entry first: STALE ones go to DELAY with their flags
    kept, static and kernel-managed ones are left alone, a vanished one is
    skipped."""
    import subprocess
    from pyroute2 import IPRoute
    ns = f"nl{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def ip(*args):
            subprocess.run(["ip", "-n", ns, *args], check=True)
        ip("link", "add", "va", "type", "veth", "peer", "name", "vb")
        ip("link", "set", "va", "up")
        ip("link", "set", "vb", "up")
        ip("addr", "add", "10.9.0.1/24", "dev", "va")
        ip("neigh", "add", "10.9.0.2", "lladdr", "02:00:00:00:00:02", "dev", "va", "nud", "permanent")
        ip("neigh", "add", "10.9.0.3", "lladdr", "02:00:00:00:00:03", "dev", "va", "nud", "stale", "extern_learn")
        ip("neigh", "add", "10.9.0.4", "lladdr", "02:00:00:00:00:04", "dev", "va", "nud", "stale")
        ip("neigh", "add", "10.9.0.6", "dev", "va", "managed")
        ip("-6", "neigh", "add", "fd00::9", "lladdr", "02:00:00:00:00:09", "dev", "va", "nud", "stale", "router")

        def table():
            out = subprocess.run(["ip", "-n", ns, "-j", "neigh", "show", "dev", "va"], check=True,
                                 capture_output=True, text=True).stdout
            return {e["dst"]: (e.get("state", []), sorted(k for k in ("extern_learn", "router", "managed") if k in e))
                    for e in json.loads(out)}

        before = table()
        with IPRoute(netns=ns) as ipr:
            idx = ipr.link_lookup(ifname="va")[0]
            keys = [neigh_key(idx, ipaddress.ip_address(d))
                    for d in ("10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.6", "10.9.0.99", "fd00::9")]
            assert Neighbors.poke(ipr, keys) == 3
        after = table()
        assert after["10.9.0.2"] == before["10.9.0.2"] == (["PERMANENT"], [])
        assert after["10.9.0.6"] == before["10.9.0.6"]
        assert after["10.9.0.3"] == (["DELAY"], ["extern_learn"])
        assert after["10.9.0.4"] == (["DELAY"], [])
        assert after["fd00::9"] == (["DELAY"], ["router"])
    finally:
        subprocess.run(["ip", "netns", "del", ns])
