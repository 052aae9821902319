"""Differential test: the data plane's FIB against the kernel's.

Routes go into the router namespace's kernel FIB with `ip -batch`, as a
routing daemon would install them, and the running agent mirrors them. For
many random destinations, the program's decision (what `bpfrouter route
get` runs) must be the route the kernel's `ip route get fibmatch` names:
prefix, type, gateway and device.

- test_fib_matches_kernel: random overlapping route sets (every prefix
  length, unicast and blackhole/unreachable/prohibit), then a third deleted
  and a fifth replaced.
- test_metrics_and_tables_match_kernel: several routes per prefix with
  different metrics, added and deleted in random order, then routes of the
  local table (AnyIP prefixes of type local, unicast routes, addresses)
  over, under and beside main-table routes, then those removed again.
- test_link_state_and_sysctls_match_kernel: several routes per prefix over
  both ports, then one port set down and up, its carrier lost and back, with
  ignore_routes_with_linkdown off and on.

Which route wins is the kernel's answer, never a rule written here."""
import ipaddress
import itertools
import json
import os
import re

import numpy as np
import pytest

from bpfrouter import netns
from bpfrouter.fib import fib_memory
from bpfrouter.fibcheck import is_routable, sample_destinations
from bpfrouter.lab import Lab
from bpfrouter.labroutes import random_routes
from tests.conftest import BPF_SKIP, bpfrouter_cmd
from tests.kernelfib import KernelFib, Match, dataplane_match, differences

from .conftest import RouterProgram, wait_for

ROUTES = {4: 3000, 6: 3000}
DESTS = 3000
GATEWAYS = {4: ["10.0.1.10", "10.0.1.11", "10.0.2.10", "10.0.2.11"],
            6: ["fd00:1::10", "fd00:1::11", "fd00:2::10", "fd00:2::11"]}
SENTINELS = itertools.count(1)


@pytest.fixture(scope="module", params=["dir", "lpm"])
def router(request):
    if BPF_SKIP:
        pytest.skip(BPF_SKIP)
    lab = Lab(f"d{os.getpid() % 10000}{request.param[0]}")
    lab.up()
    for v, gws in GATEWAYS.items():
        for i, gw in enumerate(gws):
            dev = "r-eth0" if i < 2 else "r-eth1"
            lab.run("r", ["ip", "neigh", "add", gw, "lladdr", f"02:00:00:00:0{v}:{i:02x}", "dev", dev,
                          "nud", "permanent"], check=True)
    bpfrouter_cmd("up", "r-eth0", "r-eth1", "--name", lab.name, "--fib-impl", request.param,
                  netns=lab.router_ns, check=True)
    yield lab
    lab.down()


def kernel_prefixes(lab: Lab, version: int) -> int:
    """The distinct prefixes of the main and local tables: the agent mirrors every
    one (a type the fast path does not implement as passed), but multicast
    routes to multicast destinations, which are passed before any lookup."""
    out = lab.run("r", ["ip", "-j", f"-{version}", "route", "show", "table", "all"], check=True).stdout
    return len({r["dst"] for r in json.loads(out) if r.get("table", "main") in ("main", "local")
                and not (r.get("type") == "multicast" and ipaddress.ip_network(r["dst"]).is_multicast)})


def mirrored(prog: "RouterProgram", version: int) -> int:
    """The prefixes the data plane's maps hold, counted as `bpfrouter status` does."""
    return fib_memory(prog.dp)[version]["routes"]


def batch(lab: Lab, tmp_path, lines: list[str]) -> None:
    f = tmp_path / "batch"
    f.write_text("\n".join(lines) + "\n")
    p = lab.run("r", ["ip", "-batch", str(f)], timeout=120)
    failed = re.search(r"Command failed .*:(\d+)", p.stderr)
    assert p.returncode == 0, f"the kernel refused {lines[int(failed[1]) - 1] if failed else 'a change'!r}: " \
        f"{p.stderr.strip()}"


def settle(lab: Lab, prog: RouterProgram, version: int) -> None:
    """Wait until the agent has applied every change made so far (a count of
    prefixes would not tell a changed metric). The agent reads the kernel's
    notifications in order and applies them in batches, one after the other,
    but a batch's writes may show in any order. So: a new host route goes in
    last, and once the program knows it, its batch was taken; then a second
    one, which lands in a later batch: once the program knows that one, the
    first one's batch, and all before it, are complete."""
    for _ in range(2):
        n = next(SENTINELS)
        host = ipaddress.ip_network(f"198.18.{n >> 8}.{n & 255}/32" if version == 4 else f"2001:db8:ffff::{n:x}/128")
        lab.run("r", ["ip", "route", "add", "blackhole", str(host)], check=True)
        # its own prefix: a test's blackhole route may cover the address already
        assert wait_for(lambda: prog.probe(host.network_address).prefix == str(host), timeout=20), \
            f"the agent did not mirror {host}"


def check(lab: Lab, prog: RouterProgram, rng, prefixes, version: int, dests: int = DESTS, also=()) -> None:
    """The program against the kernel, for random destinations (half inside
    the given prefixes) and those in also."""
    settle(lab, prog, version)
    assert mirrored(prog, version) == kernel_prefixes(lab, version)
    sample = sample_destinations(rng, list(prefixes), dests, version) + [a for a in also if is_routable(a)]
    with KernelFib(lab.router_ns) as k:
        bad = differences(k, prog.dp, sample, prog.iif, prog.mac, dp_ns=lab.router_ns)
    assert not bad, f"{len(bad)} of {len(sample)} differ, e.g. " + "; ".join(bad[:5])


@pytest.fixture
def prog(router):
    p = RouterProgram(router)
    yield p
    p.close()


@pytest.mark.parametrize("version", [4, 6])
def test_fib_matches_kernel(router, prog, version, tmp_path):
    lab = router
    rng = np.random.default_rng(1000 + version)
    routes = random_routes(rng, ROUTES[version], version, GATEWAYS[version])
    batch(lab, tmp_path, [r.ip_batch_line() for r in routes])
    check(lab, prog, rng, [r.prefix for r in routes], version)

    order = rng.permutation(len(routes))
    deleted = [routes[i] for i in order[: len(routes) // 3]]
    replaced = [routes[i] for i in order[len(routes) // 3: len(routes) // 3 + len(routes) // 5]]
    lines = [r.ip_batch_line("del") for r in deleted]
    for r in replaced:
        if r.type == "unicast":
            gw = GATEWAYS[version][(GATEWAYS[version].index(r.gateway) + 1) % len(GATEWAYS[version])]
            lines.append(type(r)(r.prefix, "unicast", gw).ip_batch_line("replace"))
        else:
            lines.append(type(r)(r.prefix, "unicast", GATEWAYS[version][0]).ip_batch_line("replace"))
    batch(lab, tmp_path, lines)
    check(lab, prog, rng, [r.prefix for r in routes], version)
    proc = bpfrouter_cmd("verify", "--count", "200", "--seed", "7", "--name", lab.name)
    assert proc.returncode == 0 and "0 differ" in proc.stdout, proc.stdout + proc.stderr


KINDS = ("blackhole", "unreachable", "prohibit")


def route_line(verb: str, prefix, kind: str, gateway: str | None, metric: int, table: str = "main") -> str:
    via = f" via {gateway}" if kind == "unicast" else (" dev lo" if kind == "local" else "")
    return f"route {verb} {kind} {prefix}{via} metric {metric} table {table}"


def cli_match(lab: Lab, dst) -> Match:
    """`bpfrouter route get -j` in the shape of the kernel's answer."""
    got = json.loads(bpfrouter_cmd("route", "get", str(dst), "-j", "--name", lab.name, check=True).stdout)
    route = got["route"]
    if route is None:
        return Match("none" if got["reason"] == "fib_miss" else f"reason {got['reason']}")
    if route["type"] != "unicast":
        return Match(route["type"], route["prefix"])
    links = json.loads(lab.run("r", ["ip", "-j", "link"], check=True).stdout)
    oif = {li["ifname"]: li["ifindex"] for li in links}.get(got["egress"], 0)
    return Match("unicast", route["prefix"], (got["nexthop"] or {}).get("gateway"), oif)


def strictly_inside(prefix, prefixes) -> bool:
    """Does any of prefixes lie inside prefix, and is it longer?"""
    return any(p.version == prefix.version and p.prefixlen > prefix.prefixlen and p.subnet_of(prefix)
               for p in prefixes)


@pytest.mark.parametrize("version", [4, 6])
def test_metrics_and_tables_match_kernel(router, prog, version, tmp_path):
    """Several routes per prefix (distinct metrics, mixed types), added and
    deleted in random order; then local-table routes and addresses over,
    under and beside them, then those removed in random order. After each
    phase: the program against the kernel for random destinations and every
    prefix's first and last address, and `bpfrouter route get` for a few."""
    lab = router
    rng = np.random.default_rng(2000 + version)
    gws = GATEWAYS[version]
    # what test_fib_matches_kernel left (proto boot) goes; the lab's own routes (proto kernel) stay
    lab.run("r", ["ip", f"-{version}", "route", "flush", "table", "all", "proto", "boot"], check=True)

    # 1. up to three routes for each of 150 nested prefixes, in random order
    prefixes = [s.prefix for s in random_routes(rng, 150, version, gws)]
    routes = []  # (prefix, kind, gateway, metric)
    for p in prefixes:
        for metric in rng.choice(np.arange(1, 5000), int(rng.integers(1, 4)), replace=False).tolist():
            kind = "unicast" if rng.random() < 0.7 else KINDS[int(rng.integers(3))]
            routes.append((p, kind, gws[int(rng.integers(len(gws)))] if kind == "unicast" else None, metric))
    batch(lab, tmp_path, [route_line("add", *routes[i]) for i in rng.permutation(len(routes)).tolist()])
    edges = [a for p in prefixes for a in (p.network_address, p.broadcast_address)]
    check(lab, prog, rng, prefixes, version, 600, edges)

    # 2. half of them deleted (the best of many prefixes among them), new ones with other metrics, interleaved
    gone = set(rng.choice(len(routes), len(routes) // 2, replace=False).tolist())
    lines = [route_line("del", *routes[i]) for i in sorted(gone)]
    used = {(r[0], r[3]) for r in routes}
    for p in rng.choice(np.array(prefixes, dtype=object), len(prefixes) // 3, replace=False).tolist():
        metric = int(rng.integers(1, 6000))
        if (p, metric) not in used:
            used.add((p, metric))
            lines.append(route_line("add", p, "unicast", gws[int(rng.integers(len(gws)))], metric))
    batch(lab, tmp_path, [lines[i] for i in rng.permutation(len(lines)).tolist()])
    check(lab, prog, rng, prefixes, version, 600, edges)
    dst = edges[int(rng.integers(len(edges)))]
    with KernelFib(lab.router_ns) as k:
        assert cli_match(lab, dst).agrees(k.match(dst)), f"bpfrouter route get {dst}"

    # 3. the local table: prefixes of the router's own (AnyIP) equal to, shorter than (IPv4) and
    #    longer than main routes, unicast and blackhole routes in the local table with a worse
    #    metric than main's, and addresses inside main routes
    width = 32 if version == 4 else 128
    local_lines, undo, taken = [], [], set()
    for i, p in enumerate(rng.permutation(np.array(prefixes, dtype=object)).tolist()[:40]):
        if i % 4 == 0 and p.prefixlen > 0 and version == 4:
            q = p.supernet(new_prefix=int(rng.integers(0, p.prefixlen)))  # covers main routes
        elif i % 4 == 1 and p.prefixlen < width:
            q = next(p.subnets(new_prefix=int(rng.integers(p.prefixlen + 1, min(width, p.prefixlen + 24) + 1))))
        else:
            q = p
        if q in taken or (version == 6 and strictly_inside(q, prefixes)):
            continue  # one route each; and see test_ipv6_local_table_prefix_shadows_longer_main_routes
        taken.add(q)
        kind = ("local", "local", "unicast", "blackhole")[i % 4] if q == p else "local"
        gw = gws[int(rng.integers(len(gws)))] if kind == "unicast" else None
        local_lines.append(route_line("add", q, kind, gw, 9000, "local"))
        undo.append(route_line("del", q, kind, gw, 9000, "local"))
        edges += [q.network_address, q.broadcast_address]
    for j, p in enumerate(prefixes[:6]):
        host = p.network_address + int(rng.integers(min(p.num_addresses, 1 << 20)))
        dev, plen = ("lo", width) if j % 2 else ("r-eth1", width - 4)  # a subnet on a port: a connected route too
        local_lines.append(f"address add {host}/{plen} dev {dev}" + (" nodad" if version == 6 else ""))
        undo.append(f"address del {host}/{plen} dev {dev}")
        edges += [host, host + 1, host - 1]
    batch(lab, tmp_path, [local_lines[i] for i in rng.permutation(len(local_lines)).tolist()])
    check(lab, prog, rng, prefixes, version, 600, edges)
    for dst in (edges[-1], edges[-20]):  # an address's neighbour, a local-table prefix's edge
        with KernelFib(lab.router_ns) as k:
            assert cli_match(lab, dst).agrees(k.match(dst)), f"bpfrouter route get {dst}"

    # 4. and removed again, in random order
    batch(lab, tmp_path, [undo[i] for i in rng.permutation(len(undo)).tolist()])
    check(lab, prog, rng, prefixes, version, 600, edges)


def test_ipv6_local_table_prefix_shadows_longer_main_routes(router, prog, tmp_path):
    """IPv6 looks its local table up first as a whole (fib6_rule_lookup without
    custom rules), so a local-table prefix wins over a longer main-table route
    inside it (IPv4's merged table takes the longest prefix of both). The
    fast path's image holds the shadowed route as local, at its own prefix,
    and gives it back when the local prefix goes."""
    lab = router
    dst = ipaddress.ip_address("fd77:0:3::5")
    batch(lab, tmp_path, ["route add fd77:0:3::/48 via fd00:1::10"])
    try:
        settle(lab, prog, 6)
        with KernelFib(lab.router_ns) as k:
            assert k.match(dst).kind == "unicast"
            assert not differences(k, prog.dp, [dst], prog.iif, prog.mac, dp_ns=lab.router_ns)
        for local_first in (True, False):   # the local prefix after the main route, then before it
            if not local_first:
                batch(lab, tmp_path, ["route del fd77:0:3::/48"])
            batch(lab, tmp_path, ["route add local fd77::/32 dev lo table local"])
            if not local_first:
                batch(lab, tmp_path, ["route add fd77:0:3::/48 via fd00:1::10"])
            settle(lab, prog, 6)
            with KernelFib(lab.router_ns) as k:
                assert k.match(dst).agrees(Match("local", "fd77::/32")), "the kernel's behaviour this test is about"
            with netns.entered(lab.router_ns):
                got = dataplane_match(prog.dp, dst, prog.iif, prog.mac)
            assert (got.kind, got.prefix) == ("local", "fd77:0:3::/48"), got
            batch(lab, tmp_path, ["route del local fd77::/32 dev lo table local"])
            settle(lab, prog, 6)
            with KernelFib(lab.router_ns) as k:
                bad = differences(k, prog.dp, [dst], prog.iif, prog.mac, dp_ns=lab.router_ns)
            assert not bad, bad
    finally:
        batch(lab, tmp_path, ["route del fd77:0:3::/48"])


def agree_after_change(lab: Lab, prog: RouterProgram, rng, prefixes, version: int, what: str, dests: int = 400) -> None:
    """The program against the kernel after a change of link state or sysctl:
    the kernel changes routes on these without telling (IPv4 flushes a downed
    link's routes with no RTM_DELROUTE), so the mirror may follow by a re-dump;
    the comparison is repeated until it agrees or 20 s have passed."""
    settle(lab, prog, version)
    sample = sample_destinations(rng, list(prefixes), dests, version)

    def bad():
        with KernelFib(lab.router_ns) as k:
            return differences(k, prog.dp, sample, prog.iif, prog.mac, dp_ns=lab.router_ns)
    wait_for(lambda: not bad(), timeout=20, interval=0.5)
    found = bad()
    assert not found, f"{what}: {len(found)} of {len(sample)} differ, e.g. " + "; ".join(found[:5])


@pytest.mark.parametrize("version", [4, 6])
def test_link_state_and_sysctls_match_kernel(router, prog, version, tmp_path):
    """Several routes per prefix over gateways of both ports, then r-eth1 set
    down and up again, its carrier lost (h2's end down) with
    ignore_routes_with_linkdown off and then on, and the carrier back. After
    each step: the program against the kernel for random destinations. The
    lab is put back as it was (addresses, neighbours, sysctls) at the end."""
    lab = router
    rng = np.random.default_rng(3000 + version)
    gws = GATEWAYS[version]
    lab.run("r", ["ip", f"-{version}", "route", "flush", "table", "all", "proto", "boot"], check=True)
    prefixes = [s.prefix for s in random_routes(rng, 100, version, gws)]
    lines = []
    for p in prefixes:
        for metric in rng.choice(np.arange(1, 5000), int(rng.integers(1, 4)), replace=False).tolist():
            lines.append(route_line("add", p, "unicast", gws[int(rng.integers(len(gws)))], metric))
    batch(lab, tmp_path, [lines[i] for i in rng.permutation(len(lines)).tolist()])
    agree_after_change(lab, prog, rng, prefixes, version, "routes installed")
    sysctl = f"net.ipv{version}.conf.all.ignore_routes_with_linkdown"
    try:
        lab.run("r", ["ip", "link", "set", "r-eth1", "down"], check=True)
        agree_after_change(lab, prog, rng, prefixes, version, "r-eth1 down")
        lab.run("r", ["ip", "link", "set", "r-eth1", "up"], check=True)
        restore_lab(lab)
        agree_after_change(lab, prog, rng, prefixes, version, "r-eth1 up again (IPv4 routes via it flushed)")
        batch(lab, tmp_path, [line.replace("route add", "route replace") for line in lines])
        agree_after_change(lab, prog, rng, prefixes, version, "routes via r-eth1 back")
        lab.run("h2", ["ip", "link", "set", "h2-eth0", "down"], check=True)
        agree_after_change(lab, prog, rng, prefixes, version, "r-eth1 lost its carrier")
        lab.run("r", ["sysctl", "-qw", f"{sysctl}=1"], check=True)
        agree_after_change(lab, prog, rng, prefixes, version,
                           "r-eth1 without carrier, ignore_routes_with_linkdown=1")
        lab.run("h2", ["ip", "link", "set", "h2-eth0", "up"], check=True)
        agree_after_change(lab, prog, rng, prefixes, version, "carrier back, ignore_routes_with_linkdown=1")
        lab.run("r", ["sysctl", "-qw", f"{sysctl}=0"], check=True)
        agree_after_change(lab, prog, rng, prefixes, version, "ignore_routes_with_linkdown=0 again")
    finally:
        lab.run("r", ["sysctl", "-qw", f"{sysctl}=0"])
        lab.run("h2", ["ip", "link", "set", "h2-eth0", "up"])
        lab.run("r", ["ip", "link", "set", "r-eth1", "up"])
        restore_lab(lab)


def restore_lab(lab: Lab) -> None:
    """What a link set down takes with it: r-eth1's IPv6 address (no
    keep_addr_on_down) and its permanent neighbours."""
    lab.run("r", ["ip", "addr", "replace", "fd00:2::1/64", "dev", "r-eth1", "nodad"], check=True)
    lab.run("r", ["ip", "addr", "replace", "10.0.2.1/24", "dev", "r-eth1"], check=True)
    for v, gws in GATEWAYS.items():
        for i, gw in enumerate(gws[2:], start=2):
            lab.run("r", ["ip", "neigh", "replace", gw, "lladdr", f"02:00:00:00:0{v}:{i:02x}", "dev", "r-eth1",
                          "nud", "permanent"], check=True)
