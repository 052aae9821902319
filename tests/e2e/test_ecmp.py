"""ECMP end to end: real traffic over every path of a kernel next-hop group,
forwarded by XDP, with the group changed under it.

h2 has four macvlan ports p1..p4 (10.0.2.11-14, each with its own MAC) and
takes 10.60.0.0/16 and 10.61.0.0/16 as its own (local routes), so each path
of the router's group ends at its own port; a UDP sink there reports each
datagram's destination and the port it came in on (IP_PKTINFO). A flow is a
destination address (the multipath hash policy is 0: addresses only).

- iproute2: a resilient group (`ip nexthop ... type resilient`). Removing a
  member moves exactly its flows; adding it back, the kernel moves buckets
  to it in the background (its idle timer), announced bucket by bucket, and
  the fast path's table follows until it equals the kernel's.
- FRR: zebra and staticd install four static routes to one prefix as a
  kernel next-hop group; removing one (vtysh) moves only its flows. The
  kernel's hash-threshold group would move others too; the fast path keeps
  them (bpfrouter/ecmp.py). Every flow lands on a path of the kernel's group,
  and stays there across an agent restart.

Kernel VRFs (l3mdev) are not built into this kernel (CONFIG_NET_VRF), so
FRR's VRF route is not part of this test."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from bpfrouter.datapath import layout as lo
from bpfrouter.nexthop import nexthop_of_value

from .conftest import RouterProgram, wait_for

PATHS = 4
PORT = 7000
FLOWS = 400
GATEWAYS = [f"10.0.2.{11 + i}" for i in range(PATHS)]

SINK = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
IP_PKTINFO = 8  # linux/in.h (not in the socket module)
s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    _, anc, _, _ = s.recvmsg(64, 256)
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            ifindex, _, dst = struct.unpack("=I4s4s", data[:12])
            print(socket.inet_ntoa(dst), ifindex, flush=True)
"""
SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for dst in sys.argv[2:]:
    s.sendto(b"ecmp", (dst, int(sys.argv[1])))
    time.sleep(0.001)
"""


def flow_dsts(net: str) -> list[str]:
    base = net.rsplit(".", 2)[0]
    return [f"{base}.{i // 200}.{i % 200 + 1}" for i in range(FLOWS)]


class Sink:
    """Which of h2's ports each destination's datagram came in on."""

    def __init__(self, lab):
        self.proc = lab.popen("h2", [sys.executable, "-c", SINK, str(PORT)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.got: dict[str, int] = {}
        self.count = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            dst, ifindex = line.split()
            self.got[dst] = int(ifindex)
            self.count += 1

    def close(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def ecmp_lab(bpf_router):
    """The module's lab router, with h2's four ports and the sink."""
    lr = bpf_router
    lab = lr.lab
    ports = {}
    for i, gw in enumerate(GATEWAYS):
        name = f"p{i + 1}"
        lab.run("h2", ["ip", "link", "add", name, "link", "h2-eth0", "type", "macvlan", "mode", "bridge"], check=True)
        lab.run("h2", ["ip", "link", "set", name, "address", f"02:00:00:00:ec:0{i + 1}", "up"], check=True)
        lab.run("h2", ["ip", "addr", "add", f"{gw}/24", "dev", name], check=True)
        ports[json.loads(lab.run("h2", ["ip", "-j", "link", "show", name], check=True).stdout)[0]["ifindex"]] = i
    for net in ("10.60.0.0/16", "10.61.0.0/16"):
        lab.run("h2", ["ip", "route", "add", "local", net, "dev", "lo"], check=True)
    for key in ("all", "default", *(f"p{i + 1}" for i in range(PATHS))):
        lab.run("h2", ["sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0"], check=True)
    # each port answers ARP for its own address only (h2-eth0 would answer for
    # all), and asks with its own (a reply leaving h2-eth0 from 10.0.2.11 would
    # teach the router h2-eth0's MAC for it)
    lab.run("h2", ["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1"], check=True)
    lab.run("h2", ["sysctl", "-qw", "net.ipv4.conf.all.arp_announce=2"], check=True)
    for gw in GATEWAYS:  # the router resolves its next hops before the traffic
        assert lab.run("r", ["ping", "-c1", "-W2", gw]).returncode == 0
    sink = Sink(lab)
    yield lr, sink, ports
    sink.close()


def send(lr, sink, ports, dsts: list[str]) -> list[int]:
    """Send one datagram to each destination; the path (0..3) each took.
    The router's XDP program forwarded every one of them (its counter)."""
    fwd0, seen0 = lr.forwarded(), sink.count
    lr.lab.run("h1", [sys.executable, "-c", SENDER, str(PORT), *dsts], check=True)
    assert wait_for(lambda: sink.count >= seen0 + len(dsts), timeout=20), f"{sink.count - seen0} of {len(dsts)} arrived"
    assert lr.forwarded() - fwd0 == len(dsts), "not every datagram was forwarded by XDP"
    return [ports[sink.got[d]] for d in dsts]


class Router(RouterProgram):
    """The lab router's maps, read in its namespace: what the fast path
    would do with a flow from h1, and the bucket table of its group."""

    def probe(self, dst: str):
        return super().probe(dst, src="10.0.1.2", sport=0)

    def paths(self, dst: str) -> int | None:
        """How many paths the group of dst's route has (None: not ECMP now)."""
        d = self.probe(dst)
        return d.ecmp["paths"] if d.ecmp else None

    def table(self, dst: str) -> list[str]:
        """The gateway of each bucket of the group dst's route names."""
        d = self.probe(dst)
        g = self.dp.nh_groups.lookup(lo.u32(d.ecmp["group"]))
        gws = []
        for i in range(g.buckets):
            nid = self.dp.nh_buckets.lookup(lo.u32(g.bucket_base + i)).value
            gws.append(str(nexthop_of_value(self.dp.nexthops.lookup(lo.u32(nid))).gateway))
        return gws



@pytest.fixture(scope="module")
def router(ecmp_lab):
    r = Router(ecmp_lab[0].lab)
    yield r
    r.close()


def kernel_buckets(lab, group: int) -> list[str]:
    out = json.loads(lab.run("r", ["ip", "-j", "nexthop", "bucket", "show", "id", str(group)], check=True).stdout)
    by_index = {b["bucket"]["index"]: b["bucket"]["nhid"] for b in out}
    return [GATEWAYS[by_index[i] - 1] for i in range(len(by_index))]


def moved(before: list[int], after: list[int]) -> set[int]:
    return {i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}


def test_resilient_group_keeps_flows_and_follows_the_kernels_buckets(ecmp_lab, router):
    lr, sink, ports = ecmp_lab
    lab = lr.lab
    nh = ["ip", "nexthop"]
    for i, gw in enumerate(GATEWAYS):
        lab.run("r", [*nh, "add", "id", str(i + 1), "via", gw, "dev", "r-eth1"], check=True)
    res = ["type", "resilient", "buckets", "64", "idle_timer", "1", "unbalanced_timer", "0"]
    lab.run("r", [*nh, "add", "id", "100", "group", "1/2/3/4", *res], check=True)
    lab.run("r", ["ip", "route", "add", "10.60.0.0/16", "nhid", "100"], check=True)
    dsts = flow_dsts("10.60.0.0/16")
    assert wait_for(lambda: (d := router.probe(dsts[0])).ecmp and d.ecmp.get("kernel_id") == 100, timeout=10)

    before = send(lr, sink, ports, dsts)
    assert set(before) == set(range(PATHS)), "a path carried nothing"
    for dst, path in list(zip(dsts, before, strict=True))[:40]:  # route get tells what the packets did
        assert router.probe(dst).gateway == GATEWAYS[path]

    # member 4 leaves: the kernel hands its buckets to the others at once
    lab.run("r", [*nh, "replace", "id", "100", "group", "1/2/3", *res], check=True)
    assert wait_for(lambda: router.paths(dsts[0]) == 3, timeout=10)
    assert router.table(dsts[0]) == kernel_buckets(lab, 100)
    after = send(lr, sink, ports, dsts)
    assert moved(before, after) == {i for i, p in enumerate(before) if p == 3}, "flows of staying paths moved"

    # member 4 is back: it gets no bucket at first; the kernel moves idle buckets
    # to it once the idle timer runs out, one RTM_NEWNEXTHOPBUCKET each
    lab.run("r", [*nh, "replace", "id", "100", "group", "1/2/3/4", *res], check=True)
    assert wait_for(lambda: router.paths(dsts[0]) == 4, timeout=10)
    assert wait_for(lambda: GATEWAYS[3] in kernel_buckets(lab, 100)
                    and router.table(dsts[0]) == kernel_buckets(lab, 100), timeout=15), \
        "the fast path's buckets did not follow the kernel's"
    again = send(lr, sink, ports, dsts)
    assert {again[i] for i in moved(after, again)} == {3}, "flows moved between the paths that stayed"
    lab.run("r", ["ip", "route", "del", "10.60.0.0/16"], check=True)
    lab.run("r", [*nh, "flush"], check=True)


FRR = "/usr/lib/frr"


@pytest.fixture
def frr(ecmp_lab):
    """zebra and staticd in the lab router's namespace, with four static
    routes to 10.61.0.0/16. Their directory is one the frr user (they drop
    to it) can reach: pytest's tmp_path is root's alone."""
    if not os.path.exists(f"{FRR}/zebra"):
        pytest.fail("FRR is not installed (scripts/install-deps.sh installs the Debian package frr)")
    lab = ecmp_lab[0].lab
    run_dir = Path(tempfile.mkdtemp(prefix="bpfrouter-frr-"))
    os.chmod(run_dir, 0o755)
    shutil.chown(run_dir, "frr", "frr")
    (run_dir / "zebra.conf").write_text("hostname bpfrouter-lab\n")
    (run_dir / "staticd.conf").write_text("".join(f"ip route 10.61.0.0/16 {gw}\n" for gw in GATEWAYS))
    common = ["-z", str(run_dir / "zserv.api"), "--vty_socket", str(run_dir), "-u", "frr", "-g", "frr"]
    procs = []
    try:
        for daemon in ("zebra", "staticd"):
            procs.append(lab.popen("r", [f"{FRR}/{daemon}", "-f", str(run_dir / f"{daemon}.conf"),
                                         "-i", str(run_dir / f"{daemon}.pid"), *common,
                                         "--log", f"file:{run_dir / daemon}.log"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if daemon == "zebra":
                assert wait_for(lambda: (run_dir / "zserv.api").exists(), timeout=10), "zebra did not start"
        yield lambda *cmds: lab.run("r", ["vtysh", "--vty_socket", str(run_dir), "-c", "configure terminal",
                                          *[a for c in cmds for a in ("-c", c)]], check=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        lab.run("r", ["ip", "route", "del", "10.61.0.0/16"])
        shutil.rmtree(run_dir, ignore_errors=True)


def kernel_gateways(lab, prefix: str) -> set[str]:
    routes = json.loads(lab.run("r", ["ip", "-j", "route", "show", prefix], check=True).stdout)
    return {h["gateway"] for r in routes for h in r.get("nexthops", [r])}


def test_frr_ecmp_through_kernel_next_hop_objects(ecmp_lab, router, frr):
    lr, sink, ports = ecmp_lab
    lab = lr.lab
    dsts = flow_dsts("10.61.0.0/16")
    assert wait_for(lambda: kernel_gateways(lab, "10.61.0.0/16") == set(GATEWAYS), timeout=20), \
        "zebra did not install the four paths"
    route = json.loads(lab.run("r", ["ip", "-j", "route", "show", "10.61.0.0/16"], check=True).stdout)[0]
    assert route.get("nhid") and route["protocol"] == "static", route  # a kernel next-hop object of zebra's
    assert wait_for(lambda: router.paths(dsts[0]) == PATHS, timeout=10)
    shown = next(r for r in lr.json("route", "show") if r["prefix"] == "10.61.0.0/16")
    assert shown["type"] == "multipath" and {h["gateway"] for h in shown["nexthops"]} == set(GATEWAYS), shown

    before = send(lr, sink, ports, dsts)
    assert set(before) == set(range(PATHS)), "a path carried nothing"
    assert all(abs(before.count(p) / FLOWS - 1 / PATHS) < 0.1 for p in range(PATHS)), \
        [before.count(p) for p in range(PATHS)]

    frr(f"no ip route 10.61.0.0/16 {GATEWAYS[2]}")
    assert wait_for(lambda: kernel_gateways(lab, "10.61.0.0/16") == set(GATEWAYS) - {GATEWAYS[2]}, timeout=20)
    assert wait_for(lambda: router.paths(dsts[0]) == PATHS - 1, timeout=10)
    after = send(lr, sink, ports, dsts)
    assert moved(before, after) == {i for i, p in enumerate(before) if p == 2}, "flows of staying paths moved"
    assert {GATEWAYS[p] for p in after} <= kernel_gateways(lab, "10.61.0.0/16")

    # a restarted agent reads the groups back and keeps every flow where it was
    lr.cli("agent", "stop")
    lr.cli("agent", "start")
    assert send(lr, sink, ports, dsts) == after, "flows moved across an agent restart"
