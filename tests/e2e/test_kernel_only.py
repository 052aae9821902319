"""What only the kernel can route goes to the kernel; the rest takes the fast
path, also through kernel next-hop objects.

Each test sends marked UDP frames from h1 into the router and counts where
they come out: at h1 (back out of r-eth0) or at h2 (out of r-eth1), and with
which bytes. Main holds 10.0.0.0/8 via h2, so a fast path that routes by main
alone sends everything to h2 unchanged. The kernel is the oracle: `ip route
get` in the router states each test's premise first."""
import json
import select
import socket
import subprocess

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bpfrouter import netns, observe
from bpfrouter.datapath import Datapath
from bpfrouter.datapath import layout as lo
from bpfrouter.interfaces import Interfaces

from .conftest import wait_for

MARK = b"bpfrouter-kernel-only"
N = 20
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
COVER = "10.0.0.0/8"  # main's route via h2, which routing by main alone would take

LWT_PROGRAM = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
/* Rewrites the first UDP payload byte (after a 20-byte IPv4 header): proof
 * that the packet went through the route's encapsulation. */
SEC("lwt_xmit")
int mark(struct __sk_buff *skb)
{
	__u8 e = 'E';

	bpf_skb_store_bytes(skb, 28, &e, 1, 0);
	return BPF_OK;
}
char _license[] SEC("license") = "GPL";
"""


class Wire:
    """Raw sockets on h1-eth0 (sends, and sees what the router sends back) and
    h2-eth0 (sees what the router sends there)."""

    def __init__(self, lab):
        self.lab = lab
        self.socks = {}
        for node in ("h1", "h2"):
            with netns.entered(lab.ns(node)):
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                s.bind((f"{node}-eth0", 0))
            s.setblocking(False)
            self.socks[node] = s
        _, self.r_mac = lab.link("r", "r-eth0")
        _, self.h1_mac = lab.link("h1", "h1-eth0")

    def close(self):
        for s in self.socks.values():
            s.close()

    def _drain(self):
        for s in self.socks.values():
            while select.select([s], [], [], 0)[0]:
                s.recv(65536)

    def send(self, dst: str, n: int = N, src: str = "10.0.1.2") -> dict[str, dict[bytes, int]]:
        """Send n marked frames to dst; wait until n have come out of the router
        (anywhere); return {host: {tag byte: count}}."""
        self._drain()
        for i in range(n):
            frame = Ether(dst=self.r_mac, src=self.h1_mac) / IP(src=src, dst=dst, ttl=64) / \
                UDP(sport=40000, dport=9, chksum=0) / (b"K" + MARK + i.to_bytes(2, "big"))
            self.socks["h1"].send(bytes(frame))
        seen: dict[str, dict[bytes, int]] = {"h1": {}, "h2": {}}

        def arrived() -> bool:
            for node, s in self.socks.items():
                while select.select([s], [], [], 0)[0]:
                    data, addr = s.recvfrom(65536)
                    # the frames themselves, not ICMP errors or redirects quoting them
                    if addr[2] == PACKET_OUTGOING or data[12:14] != b"\x08\x00" or data[23] != 17 \
                            or data[43:43 + len(MARK)] != MARK:
                        continue
                    tag = data[42:43]
                    seen[node][tag] = seen[node].get(tag, 0) + 1
            return sum(sum(t.values()) for t in seen.values()) >= n

        assert wait_for(arrived, timeout=15), f"{dst}: only {seen} of {n} frames came out of the router"
        return seen


@pytest.fixture(scope="module")
def wire(bpf_router):
    lab = bpf_router.lab
    lab.run("r", ["ip", "route", "replace", COVER, "via", "10.0.2.2", "dev", "r-eth1"], check=True)
    for host in ("10.0.1.2", "10.0.2.2"):  # neighbors known: routing by main alone would forward at once
        lab.run("r", ["ping", "-c", "1", "-W", "2", host], check=True)
    w = Wire(lab)
    yield w
    w.close()
    lab.run("r", ["ip", "route", "del", COVER])


class Probe:
    """The loaded program's decisions, asked in-process (BPF_PROG_TEST_RUN in
    the router's namespace): the CLI's `route get` costs a process each, and
    the tests wait on these. Each test also asks the CLI once."""

    def __init__(self, lab):
        self.ns = lab.router_ns
        self.dp = Datapath.open(lab.name)
        self.ports = {name: lab.link("r", name) for name in ("r-eth0", "r-eth1")}
        self.names = {idx: name for name, (idx, _) in self.ports.items()}

    def close(self):
        self.dp.close()

    def __call__(self, dst: str, iif: str = "r-eth0", src: str | None = None) -> dict:
        idx, mac = self.ports[iif]
        with netns.entered(self.ns):
            d = observe.probe(self.dp, dst, idx, mac, src)
        return {"reason": d.reason.label, "egress": self.names.get(d.egress_ifindex)}

    def counted(self, reason: str, iface: str = "r-eth0") -> int:
        """Packets counted with reason (a label) on a port."""
        idx = self.ports[iface][0]
        return sum(pk for (i, why), (pk, _) in observe.read_counters(self.dp).items()
                   if i == idx and why.label == reason)

    def policy(self) -> dict[str, list[str]]:
        """Each port's families passed for policy routing, from the ifaces map."""
        bits = (("ipv4", lo.IFACE_F_PASS_POLICY4), ("ipv6", lo.IFACE_F_PASS_POLICY6))
        return {self.names[i]: [f for f, b in bits if v.flags & b] for i, v in Interfaces(self.dp).configured().items()}


@pytest.fixture(scope="module")
def probe(bpf_router):
    p = Probe(bpf_router.lab)
    yield p
    p.close()


def kernel_dev(lab, dst: str, *extra: str) -> str | None:
    proc = lab.run("r", ["ip", "-j", "route", "get", dst, *extra])
    return json.loads(proc.stdout)[0].get("dev") if proc.returncode == 0 else proc.stderr.strip()


def test_encap_route_is_passed_and_the_kernel_encapsulates(bpf_router, wire, probe, tmp_path):
    """An lwtunnel route (encap bpf: the only kind this kernel builds in besides
    `ip`, whose metadata only collect_md tunnels read) out of a managed port:
    the fast path used to forward its packets bare."""
    r, lab = bpf_router, bpf_router.lab
    src, obj = tmp_path / "lwt.bpf.c", tmp_path / "lwt.bpf.o"
    src.write_text(LWT_PROGRAM)
    subprocess.run(["clang-19", "-target", "bpf", "-O2", "-I/usr/include/x86_64-linux-gnu", "-c", str(src),
                    "-o", str(obj)], check=True)
    lab.run("r", ["ip", "route", "add", "10.66.0.0/16", "encap", "bpf", "xmit", "obj", str(obj), "section",
                  "lwt_xmit", "via", "10.0.2.2", "dev", "r-eth1"], check=True)
    try:
        assert kernel_dev(lab, "10.66.1.1") == "r-eth1"
        assert wait_for(lambda: probe("10.66.1.1")["reason"] == "encap", timeout=10), probe("10.66.1.1")
        assert r.json("route", "get", "10.66.1.1")["reason"] == "encap"
        row = next(x for x in r.json("route", "show") if x["prefix"] == "10.66.0.0/16")
        assert (row["type"], row["passed"]["reason"], row["passed"]["encap"]) == ("kernel", "encap", "bpf")
        before = probe.counted("encap")
        seen = wire.send("10.66.1.1")
        assert seen == {"h1": {}, "h2": {b"E": N}}, "every frame must leave encapsulated, as the kernel sends it"
        assert probe.counted("encap") - before == N
    finally:
        lab.run("r", ["ip", "route", "del", "10.66.0.0/16"])


def test_throw_route_is_passed_and_the_kernel_goes_on_to_the_next_table(bpf_router, wire, probe):
    """throw in main: the kernel goes on to the default table (rule 32767),
    which sends 10.77/16 back to h1; main alone would take 10/8 to h2. A nat
    route is passed the same way (route_type)."""
    r, lab = bpf_router, bpf_router.lab
    lab.run("r", ["ip", "route", "add", "throw", "10.77.0.0/16"], check=True)
    lab.run("r", ["ip", "route", "add", "10.77.0.0/16", "via", "10.0.1.2", "dev", "r-eth0", "table", "default"],
            check=True)
    lab.run("r", ["ip", "route", "add", "nat", "10.78.0.0/16", "scope", "255"], check=True)
    lab.run("r", ["ip", "-6", "route", "add", "throw", "fd77::/32"], check=True)
    lab.run("r", ["ip", "route", "add", "multicast", "10.79.0.0/16", "dev", "r-eth1"], check=True)
    try:
        assert kernel_dev(lab, "10.77.1.1") == "r-eth0"
        dsts = ("10.77.1.1", "10.78.1.1", "fd77::1", "10.79.1.1")  # multicast route, unicast destination
        assert wait_for(lambda: all(probe(d)["reason"] == "route_type" for d in dsts), timeout=10), \
            [probe(d) for d in dsts]
        kinds = {x["prefix"]: x["passed"]["kernel_type"] for x in r.json("route", "show") if x["passed"]}
        assert kinds["10.77.0.0/16"] == "throw" and kinds["10.78.0.0/16"] == "nat"
        assert probe.policy() == {"r-eth0": [], "r-eth1": []}, "the default table behind main changes nothing"
        before = probe.counted("route_type")
        assert wire.send("10.77.1.1") == {"h1": {b"K": N}, "h2": {}}
        assert probe.counted("route_type") - before == N
    finally:
        lab.run("r", ["ip", "route", "del", "throw", "10.77.0.0/16"])
        lab.run("r", ["ip", "route", "del", "10.77.0.0/16", "table", "default"])
        lab.run("r", ["ip", "route", "del", "nat", "10.78.0.0/16"])
        lab.run("r", ["ip", "-6", "route", "del", "throw", "fd77::/32"])
        lab.run("r", ["ip", "route", "del", "multicast", "10.79.0.0/16"])


def test_rule_to_another_table_is_walked_and_the_packet_goes_where_the_kernel_sends_it(bpf_router, wire, probe):
    """The issue's own example: a rule sends 10.0.1.0/24 -> 10.88.0.0/16 to
    table 100, which routes it back out of r-eth0. The fast path walks the
    rule and looks table 100 up itself; the route back out of the ingress is
    its hairpin, which the kernel forwards."""
    r, lab = bpf_router, bpf_router.lab
    lab.run("r", ["ip", "route", "add", "10.88.0.0/16", "via", "10.0.1.2", "dev", "r-eth0", "table", "100"],
            check=True)
    lab.run("r", ["ip", "rule", "add", "from", "10.0.1.0/24", "to", "10.88.0.0/16", "table", "100", "pref", "100"],
            check=True)
    try:
        assert kernel_dev(lab, "10.88.1.1", "from", "10.0.1.2", "iif", "r-eth0") == "r-eth0"
        assert wait_for(lambda: probe("10.88.1.1", src="10.0.1.2") == {"reason": "hairpin", "egress": "r-eth0"},
                        timeout=10), probe("10.88.1.1", src="10.0.1.2")
        assert probe.policy() == {"r-eth0": [], "r-eth1": []}, "no family is passed for its rules"
        cli = r.json("route", "get", "10.88.1.1", "from", "10.0.1.2", "iif", "r-eth0")
        assert (cli["verdict"], cli["reason"], cli["route"]["prefix"], cli["route"]["table"]) == \
            ("pass", "hairpin", "10.88.0.0/16", "100")
        assert (cli["rule"]["priority"], cli["rule"]["action"]) == (100, "lookup")
        assert r.json("status")["agent"]["policy"]["ipv4"] == "4 rules walked"
        before = probe.counted("hairpin")
        assert wire.send("10.88.1.1") == {"h1": {b"K": N}, "h2": {}}
        assert probe.counted("hairpin") - before == N
        # from another source the rule does not match: main's 10/8, forwarded
        assert probe("10.88.1.1", src="10.0.3.2")["egress"] == "r-eth1"
        # IPv6 has no rule: no walk
        assert "ipv6" not in r.json("status")["agent"]["policy"]
    finally:
        lab.run("r", ["ip", "rule", "del", "pref", "100"])
        lab.run("r", ["ip", "route", "flush", "table", "100"])
    # only the default rules again: main's route, by the fast path
    assert wait_for(lambda: probe("10.88.1.1", src="10.0.1.2")["egress"] == "r-eth1", timeout=10)
    before = probe.counted("ipv4")
    assert wire.send("10.88.1.1") == {"h1": {}, "h2": {b"K": N}}
    assert probe.counted("ipv4") - before == N


def test_iif_l3mdev_and_oif_rules(bpf_router, wire, probe):
    """`iif r-eth1` matches packets that enter r-eth1 only; the l3mdev rule a
    VRF adds matches packets entering a port enslaved to one (none here: this
    kernel has no VRF driver); `oif` rules never match forwarded packets. All
    walked by the fast path, none passed."""
    lab = bpf_router.lab
    lab.run("r", ["ip", "route", "add", "10.89.0.0/16", "via", "10.0.1.2", "dev", "r-eth0", "table", "101"],
            check=True)
    rules = [["iif", "r-eth1", "table", "101", "pref", "200"], ["l3mdev", "pref", "1000"],
             ["oif", "r-eth0", "table", "101", "pref", "201"]]
    for rule in rules:
        lab.run("r", ["ip", "rule", "add", *rule], check=True)
    try:
        assert wait_for(lambda: probe("10.89.1.1", iif="r-eth1")["egress"] == "r-eth0", timeout=10)
        assert probe.policy() == {"r-eth0": [], "r-eth1": []}
        assert kernel_dev(lab, "10.89.1.1", "from", "10.0.1.2", "iif", "r-eth0") == "r-eth1"  # main's 10/8
        assert kernel_dev(lab, "10.89.1.1", "from", "10.0.2.2", "iif", "r-eth1") == "r-eth0"  # table 101
        before = {why: probe.counted(why) for why in ("ipv4", "source_unverified", "policy")}
        assert wire.send("10.89.1.1") == {"h1": {}, "h2": {b"K": N}}
        moved = {why: probe.counted(why) - n for why, n in before.items()}
        # with rp_filter 0 the kernel's source check through the rules refuses
        # only local sources, which the fast path checks: forwarded
        assert moved == {"ipv4": N, "source_unverified": 0, "policy": 0}, moved
    finally:
        for pref in ("200", "201", "1000"):
            lab.run("r", ["ip", "rule", "del", "pref", pref])
        lab.run("r", ["ip", "route", "flush", "table", "101"])
    assert wait_for(lambda: probe("10.89.1.1", iif="r-eth1")["egress"] == "r-eth1", timeout=10)


@pytest.mark.parametrize("compat", [0, 1])
def test_nexthop_objects(bpf_router, wire, probe, compat):
    """Routes through kernel next-hop objects, as FRR installs them: with
    nexthop_compat_mode=0 a route carries only its nhid. Replacing the object
    moves every route that uses it, with no route notification."""
    lab = bpf_router.lab
    ip = ["ip", "nexthop"]
    lab.run("r", ["sysctl", "-qw", f"net.ipv4.nexthop_compat_mode={compat}"], check=True)
    try:
        lab.run("r", [*ip, "add", "id", "51", "via", "10.0.1.2", "dev", "r-eth0"], check=True)
        lab.run("r", [*ip, "add", "id", "52", "via", "10.0.2.2", "dev", "r-eth1"], check=True)
        lab.run("r", [*ip, "add", "id", "60", "group", "51/52"], check=True)
        lab.run("r", [*ip, "add", "id", "53", "blackhole"], check=True)
        lab.run("r", ["ip", "route", "add", "10.70.0.0/16", "nhid", "51"], check=True)
        lab.run("r", ["ip", "route", "add", "10.71.0.0/16", "nhid", "51"], check=True)
        lab.run("r", ["ip", "route", "add", "10.72.0.0/16", "nhid", "60"], check=True)
        lab.run("r", ["ip", "route", "add", "10.73.0.0/16", "nhid", "53"], check=True)

        assert kernel_dev(lab, "10.70.1.1") == "r-eth0"
        # probed from r-eth0: a route back out of it is the fast path's hairpin (the kernel may redirect)
        # (the group's route is ECMP: from r-eth0, its member on r-eth0 is the hairpin)
        want = {"10.70.1.1": ("hairpin", "r-eth0"), "10.73.1.1": ("blackhole", None)}
        ecmp = {("hairpin", "r-eth0"), ("ipv4", "r-eth1")}

        def got():  # the agent applies events in batches: wait for all of them
            return {d: (p["reason"], p["egress"]) for d in [*want, "10.72.1.1"] if (p := probe(d))}
        assert wait_for(lambda: {d: got()[d] for d in want} == want and got()["10.72.1.1"] in ecmp, timeout=10), got()
        before = probe.counted("hairpin")
        assert wire.send("10.70.1.1") == {"h1": {b"K": N}, "h2": {}}
        assert probe.counted("hairpin") - before == N  # the object's port, found by the fast path

        lab.run("r", [*ip, "replace", "id", "51", "via", "10.0.2.2", "dev", "r-eth1"], check=True)
        for dst in ("10.70.1.1", "10.71.1.1"):
            assert kernel_dev(lab, dst) == "r-eth1"
            assert wait_for(lambda d=dst: probe(d)["egress"] == "r-eth1", timeout=10), probe(dst)
        assert wire.send("10.71.1.1") == {"h1": {}, "h2": {b"K": N}}

        # a group's member cannot become a blackhole: another object, alone
        lab.run("r", [*ip, "add", "id", "54", "via", "10.0.2.2", "dev", "r-eth1"], check=True)
        lab.run("r", ["ip", "route", "add", "10.74.0.0/16", "nhid", "54"], check=True)
        assert wait_for(lambda: probe("10.74.1.1")["egress"] == "r-eth1", timeout=10), probe("10.74.1.1")
        lab.run("r", [*ip, "replace", "id", "54", "blackhole"], check=True)
        assert "Invalid argument" in kernel_dev(lab, "10.74.1.1")
        assert wait_for(lambda: probe("10.74.1.1")["reason"] == "blackhole", timeout=10), probe("10.74.1.1")

        lab.run("r", [*ip, "del", "id", "53"], check=True)  # its route goes with it
        assert wait_for(lambda: probe("10.73.1.1")["egress"] == "r-eth1", timeout=10), probe("10.73.1.1")
    finally:
        for prefix in ("10.70.0.0/16", "10.71.0.0/16", "10.72.0.0/16", "10.73.0.0/16", "10.74.0.0/16"):
            lab.run("r", ["ip", "route", "del", prefix])
        lab.run("r", [*ip, "flush"])
        lab.run("r", ["sysctl", "-qw", "net.ipv4.nexthop_compat_mode=1"])
