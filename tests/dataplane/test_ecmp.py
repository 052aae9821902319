"""ECMP in the fast path (bpf/stages/ecmp.h, bpfrouter/ecmp.py), measured
over 100k flows through the loaded program (BPF_PROG_TEST_RUN):

- weighted hash-threshold groups: each path's share within 2 percentage
  points of its weight's; removing a path moves only its flows, adding one
  only the flows it takes (the kernel would move others too: see ecmp.py);
- the hash fields follow fib_multipath_hash_policy: policy 0 keeps every
  flow between two hosts on one path, policy 1 spreads them by port;
- resilient groups, as the kernel builds them (`ip nexthop ... type
  resilient`) and decoded by the agent's reader: removing one of 8 members
  moves exactly the flows it carried, and every flow lands where the
  kernel's bucket table says its bucket goes.

A path is told by the destination MAC the program wrote: each gateway has
its own."""
from __future__ import annotations

import ipaddress
import json
import random
import struct
import subprocess

import pytest

from bpfrouter import netns
from bpfrouter.datapath import layout as lo
from bpfrouter.ecmp import NexthopGroup, mirror_hash_config
from bpfrouter.fib import Fib, Nexthop, Route, RouteType
from bpfrouter.neighbors import Neighbors
from bpfrouter.observe import probe, read_counters
from bpfrouter.packet import inet_checksum, udp_probe

from .harness import NS, XDP_REDIRECT, kernel_rib, own_datapath

FLOWS = 100_000
GATEWAYS = [f"10.2.0.{20 + i}" for i in range(8)]


def gw_mac(i: int) -> bytes:
    return bytes([2, 0, 0, 0, 0xEC, i])


@pytest.fixture
def ecmp_dp(env):
    """A BPF-FIB router of the test's own, with eight gateways on dpt1 (each
    with its own MAC) in its neighbor map."""
    with own_datapath(env, "ecmp") as dp:
        nb = Neighbors(dp)
        for i, gw in enumerate(GATEWAYS):
            nb.set(env.ifindex["dpt1"], ipaddress.ip_address(gw), gw_mac(i), 0x80)
        with netns.entered(NS):
            mirror_hash_config(dp)
        yield dp


def flows(n: int, seed: int, same_hosts: bool = False):
    """n UDP flows (source, destination as integers, ports) to 10.50.0.0/16:
    random sources in 10/8, destinations and ports (with same_hosts: one
    source and one destination, random ports)."""
    rng = random.Random(seed)
    net = 0x0A320000
    for _ in range(n):
        if same_hosts:
            src, dst = 0x0A010007, net + 7
        else:
            src, dst = rng.getrandbits(24) | 0x0A000000, net + rng.getrandbits(16)
        yield src, dst, rng.randrange(1024, 65536), rng.randrange(1, 65536)


def flow_probe(env, dp, flow):
    """`route get` of one flow."""
    src, dst, sport, dport = flow
    with netns.entered(NS):
        return probe(dp, ipaddress.IPv4Address(dst), env.ifindex["dpt0"], env.mac["dpt0"],
                     src=ipaddress.IPv4Address(src), sport=sport, dport=dport)


def flow_frames(mac: bytes, flow_list):
    """Each flow's UDP frame, made by patching one template (udp_probe per
    frame would cost more than the program): addresses, ports, the IPv4
    header checksum; the UDP checksum stays 0 (none, valid in IPv4)."""
    template = bytearray(udp_probe("10.1.0.7", "10.50.0.7", mac))
    template[40:42] = b"\0\0"
    for src, dst, sport, dport in flow_list:
        f = bytearray(template)
        struct.pack_into("!IIHH", f, 26, src, dst, sport, dport)
        f[24:26] = b"\0\0"
        struct.pack_into("!H", f, 24, inet_checksum(bytes(f[14:34])))
        yield bytes(f)


def frame_paths(env, dp, frames, first_mac: int = 0) -> list[int]:
    """The gateway each frame was sent to: its index among the gateways
    whose MACs are gw_mac(first_mac), gw_mac(first_mac + 1), ..."""
    by_mac = {gw_mac(first_mac + i): i for i in range(len(GATEWAYS))}
    out = []
    with netns.entered(NS):
        run = dp.program.test_run
        for frame in frames:
            res = run(frame, ingress_ifindex=env.ifindex["dpt0"])
            assert res.retval == XDP_REDIRECT, (frame.hex(), res.retval)
            out.append(by_mac[res.data[:6]])
    return out


def paths_taken(env, dp, flow_list) -> list[int]:
    """The gateway (index into GATEWAYS) each flow's frame was sent to."""
    return frame_paths(env, dp, flow_frames(env.mac["dpt0"], flow_list))


def hops(env, n: int) -> list[Nexthop]:
    return [Nexthop(env.ifindex["dpt1"], ipaddress.ip_address(gw)) for gw in GATEWAYS[:n]]


def install(dp, route: Route) -> Fib:
    fib = Fib(dp)
    fib.update(route)
    return fib


def test_weights_give_their_share(env, ecmp_dp):
    weights = [1, 2, 3, 2]
    members = tuple(zip(hops(env, 4), weights, strict=True))
    fib = install(ecmp_dp, Route(ipaddress.ip_network("10.50.0.0/16"), RouteType.UNICAST, tuple(h for h, _ in members),
                                 proto=3, group=NexthopGroup(members)))
    try:
        before = read_counters(ecmp_dp, env.ifindex["dpt0"]).get((env.ifindex["dpt0"], lo.Reason.FWD_IPV4), (0, 0))[0]
        taken = paths_taken(env, ecmp_dp, flows(FLOWS, seed=1))
        after = read_counters(ecmp_dp, env.ifindex["dpt0"])[(env.ifindex["dpt0"], lo.Reason.FWD_IPV4)][0]
        assert after - before == FLOWS, "every flow's packet is counted as forwarded"
        for i, w in enumerate(weights):
            share = taken.count(i) / FLOWS
            assert abs(share - w / sum(weights)) <= 0.02, \
                f"path {i} (weight {w}) took {share:.3%} of the flows, not {w / sum(weights):.3%}"
        # one path less: only its flows move; the path back: only the flows it takes
        flow_list = list(flows(FLOWS // 2, seed=4))
        before = paths_taken(env, ecmp_dp, flow_list)
        three = tuple(m for m in members if m[0] != hops(env, 4)[1])
        fib.update(Route(ipaddress.ip_network("10.50.0.0/16"), RouteType.UNICAST, tuple(h for h, _ in three),
                         proto=3, group=NexthopGroup(three)), replace=True)
        after = paths_taken(env, ecmp_dp, flow_list)
        moved = {i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}
        assert moved == {i for i, a in enumerate(before) if a == 1}
        fib.update(Route(ipaddress.ip_network("10.50.0.0/16"), RouteType.UNICAST, tuple(h for h, _ in members),
                         proto=3, group=NexthopGroup(members)), replace=True)
        again = paths_taken(env, ecmp_dp, flow_list)
        moved = [i for i, (a, b) in enumerate(zip(after, again, strict=True)) if a != b]
        assert {again[i] for i in moved} == {1}, "flows moved to a path that was there before"
        assert abs(len(moved) / len(flow_list) - weights[1] / sum(weights)) <= 0.02
        assert len(fib.groups.by_id) == 1, "the groups no route names were released"
    finally:
        fib.close()


def set_policy(dp, policy: int) -> None:
    with netns.entered(NS):
        with open("/proc/sys/net/ipv4/fib_multipath_hash_policy", "w") as f:
            f.write(str(policy))
        mirror_hash_config(dp)


def test_hash_policy_selects_the_fields(env, ecmp_dp):
    fib = install(ecmp_dp, Route(ipaddress.ip_network("10.50.0.0/16"), RouteType.UNICAST, tuple(hops(env, 8)),
                                 proto=3))
    try:
        same_hosts = list(flows(2000, seed=2, same_hosts=True))
        set_policy(ecmp_dp, 0)  # L3: source and destination address only
        assert len(set(paths_taken(env, ecmp_dp, same_hosts))) == 1
        set_policy(ecmp_dp, 1)  # L4: the ports too
        spread = paths_taken(env, ecmp_dp, same_hosts)
        assert all(abs(spread.count(i) / len(spread) - 1 / 8) < 0.04 for i in range(8)), \
            [spread.count(i) for i in range(8)]
        # a flow keeps its path: the same packets again, the same choices
        assert paths_taken(env, ecmp_dp, same_hosts) == spread
        # route get names the hash and the path the flow took
        d = flow_probe(env, ecmp_dp, same_hosts[0])
        assert d.route_type == "multipath" and d.ecmp["type"] == "hash-threshold" and d.ecmp["paths"] == 8
        assert d.gateway == GATEWAYS[spread[0]] and d.ecmp["path"] == spread[0] and d.ecmp["buckets"] == 256
    finally:
        set_policy(ecmp_dp, 0)
        fib.close()


def kernel_buckets(rib, group: int) -> list[str]:
    """The kernel's bucket table of a resilient group: each bucket's gateway."""
    out = subprocess.run(["ip", "-n", rib.ns, "-j", "nexthop", "bucket", "show", "id", str(group)],
                         check=True, capture_output=True, text=True).stdout
    table = {b["bucket"]["index"]: b["bucket"]["nhid"] for b in json.loads(out)}
    return [GATEWAYS[table[i] - 1] for i in range(len(table))]


def test_resilient_group_moves_only_the_removed_members_flows(env, ecmp_dp):
    with kernel_rib(env, "res") as rib:
        for i, gw in enumerate(GATEWAYS):
            rib.ip("nexthop", "add", "id", str(i + 1), "via", gw, "dev", "dpt1")
        members = "/".join(str(i + 1) for i in range(8))
        rib.ip("nexthop", "add", "id", "100", "group", members, "type", "resilient", "buckets", "512",
               "idle_timer", "0")
        rib.ip("route", "add", "10.50.0.0/16", "nhid", "100")
        fib = Fib(ecmp_dp)
        try:
            fib.replace_all(rib.dump())
            installed = fib.installed_route(ipaddress.ip_network("10.50.0.0/16"))
            assert installed.installed_type is RouteType.MULTIPATH and installed.group.buckets == 512
            flow_list = list(flows(FLOWS, seed=3))
            before = paths_taken(env, ecmp_dp, flow_list)
            buckets = kernel_buckets(rib, 100)
            # each flow went where the kernel's table sends its bucket
            for flow in flow_list[:200]:
                d = flow_probe(env, ecmp_dp, flow)
                assert d.ecmp["type"] == "resilient" and d.ecmp["kernel_id"] == 100
                assert d.gateway == buckets[d.ecmp["bucket"]]
            assert all(abs(before.count(i) / FLOWS - 1 / 8) < 0.02 for i in range(8))

            # member 8 leaves: the kernel gives its buckets to the others at once
            rib.ip("nexthop", "replace", "id", "100", "group", "/".join(str(i + 1) for i in range(7)),
                   "type", "resilient", "buckets", "512", "idle_timer", "0")
            fib.replace_all(rib.dump())
            after = paths_taken(env, ecmp_dp, flow_list)
            moved = [i for i in range(FLOWS) if before[i] != after[i]]
            carried = [i for i in range(FLOWS) if before[i] == 7]
            assert moved == carried, f"{len(moved)} flows moved, the removed member carried {len(carried)}"
            assert 7 not in after
            assert len(fib.groups.by_id) == 1, "the old group was released"
        finally:
            fib.close()


GATEWAYS6 = [f"fd02::{20 + i}" for i in range(4)]


def test_ipv6_fragments_keep_their_datagrams_path_and_ip_in_ip_hashes_inside(env, ecmp_dp):
    """IPv6: the fragments of one datagram take one path under policy 1 (the
    kernel does not hash a fragment's ports); IPv4 policy 2 spreads IP-in-IP
    tunnels between two endpoints by their inner addresses."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
    from scapy.layers.l2 import Ether
    nb = Neighbors(ecmp_dp)
    for i, gw in enumerate(GATEWAYS6):
        nb.set(env.ifindex["dpt1"], ipaddress.ip_address(gw), gw_mac(0x60 + i), 0x80)
    six = [Nexthop(env.ifindex["dpt1"], ipaddress.ip_address(gw)) for gw in GATEWAYS6]
    fib = install(ecmp_dp, Route(ipaddress.ip_network("fd50::/32"), RouteType.UNICAST, tuple(six), proto=3))
    fib.update(Route(ipaddress.ip_network("10.50.0.0/16"), RouteType.UNICAST, tuple(hops(env, 4)), proto=3))
    try:
        eth = Ether(dst=env.mac["dpt0"], src="02:00:00:00:00:01")
        with netns.entered(NS):
            with open("/proc/sys/net/ipv6/fib_multipath_hash_policy", "w") as f:
                f.write("1")
            mirror_hash_config(ecmp_dp)
        rng = random.Random(5)
        firsts, rests, whole = [], [], []
        for i in range(300):
            ip6 = IPv6(src="fd01::7", dst=f"fd50::{i + 1:x}")
            sport = rng.randrange(1024, 65536)
            firsts.append(bytes(eth / ip6 / IPv6ExtHdrFragment(id=i, m=1, offset=0) / UDP(sport=sport, dport=53)
                                / (b"x" * 64)))
            rests.append(bytes(eth / ip6 / IPv6ExtHdrFragment(id=i, m=0, offset=9, nh=17) / (b"y" * 64)))
            whole.append(bytes(eth / ip6 / UDP(sport=sport, dport=53) / b"z"))
        assert frame_paths(env, ecmp_dp, firsts, 0x60) == frame_paths(env, ecmp_dp, rests, 0x60), \
            "fragments of one datagram took different paths"
        assert set(frame_paths(env, ecmp_dp, whole, 0x60)) == set(range(4))

        tunnels = [bytes(eth / IP(src="10.1.0.7", dst="10.50.0.7", proto=4)
                         / IP(src=f"192.168.{i // 250}.{i % 250 + 1}", dst="192.168.100.1") / UDP() / b"t")
                   for i in range(300)]
        set_policy(ecmp_dp, 0)
        assert len(set(frame_paths(env, ecmp_dp, tunnels))) == 1
        set_policy(ecmp_dp, 2)
        assert set(frame_paths(env, ecmp_dp, tunnels)) == set(range(4)), "policy 2 ignored the inner header"
    finally:
        with netns.entered(NS):
            with open("/proc/sys/net/ipv6/fib_multipath_hash_policy", "w") as f:
                f.write("0")
        set_policy(ecmp_dp, 0)
        fib.close()


def test_one_path_of_an_ipv6_multipath_route_changed_asks_for_a_resync(env, ecmp_dp):
    """`ip -6 route del P via A` takes one path out of a multipath route and
    announces that path alone: the mirror cannot apply it by itself and asks
    the agent to read the routes again, which brings the route's remaining
    paths."""
    with kernel_rib(env, "mp6") as rib:
        rib.ip("-6", "route", "add", "fd50::/32", "nexthop", "via", GATEWAYS6[0], "dev", "dpt1",
               "nexthop", "via", GATEWAYS6[1], "dev", "dpt1")
        fib = Fib(ecmp_dp)
        try:
            fib.replace_all(rib.dump())
            rib.events()
            assert len(fib.installed_route(ipaddress.ip_network("fd50::/32")).group.members) == 2
            rib.ip("-6", "route", "del", "fd50::/32", "via", GATEWAYS6[1], "dev", "dpt1")
            fib.apply_batch(rib.events())
            assert fib.resync_why, "the one-path deletion was applied as if it were the route's"
            fib.replace_all(rib.dump())
            assert fib.installed_route(ipaddress.ip_network("fd50::/32")).nexthops == \
                (Nexthop(env.ifindex["dpt1"], ipaddress.ip_address(GATEWAYS6[0])),)
        finally:
            fib.close()
