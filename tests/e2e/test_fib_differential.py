"""Differential test: the data plane's FIB against the kernel's.

Random overlapping route sets (every prefix length, /0../32 and /0../128,
unicast and blackhole/unreachable/prohibit) go into the router namespace's
kernel FIB with `ip -batch`, as a routing daemon would install them; the
agent mirrors them. For many random destinations, the program's decision
(what `bpfrouter route get` runs) must equal `ip route get`. Then a third of
the routes is deleted and a fifth replaced, and the check runs again."""
import json
import os

import numpy as np
import pytest
from pyroute2 import IPRoute

from bpfrouter import netns
from bpfrouter.datapath import Datapath
from bpfrouter.fibcheck import sample_destinations, verify
from bpfrouter.interfaces import Interfaces
from bpfrouter.lab import Lab
from bpfrouter.labroutes import random_routes
from tests.conftest import BPF_SKIP, bpfrouter_cmd

from .conftest import wait_for

ROUTES = {4: 3000, 6: 3000}
DESTS = 3000
GATEWAYS = {4: ["10.0.1.10", "10.0.1.11", "10.0.2.10", "10.0.2.11"],
            6: ["fd00:1::10", "fd00:1::11", "fd00:2::10", "fd00:2::11"]}


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
    with IPRoute(netns=lab.router_ns) as ipr:
        return len({(m.get_attr("RTA_DST"), m["dst_len"])
                    for m in ipr.route("dump", family=2 if version == 4 else 10)
                    if m.get_attr("RTA_TABLE") in (254, 255) and m["type"] != 5})


def mirrored(lab: Lab, version: int) -> int:
    st = json.loads(bpfrouter_cmd("status", "-j", "--name", lab.name, check=True).stdout)
    return st["fib"][f"ipv{version}"]


def batch(lab: Lab, tmp_path, lines: list[str]) -> None:
    f = tmp_path / "batch"
    f.write_text("\n".join(lines) + "\n")
    lab.run("r", ["ip", "-batch", str(f)], check=True, timeout=120)


def check(lab: Lab, rng, routes, version: int) -> None:
    assert wait_for(lambda: mirrored(lab, version) == kernel_prefixes(lab, version), timeout=20), \
        f"mirror incomplete: {mirrored(lab, version)} vs {kernel_prefixes(lab, version)} in the kernel"
    dests = sample_destinations(rng, [r.prefix for r in routes], DESTS, version)
    with netns.entered(lab.router_ns):
        dp = Datapath.open(lab.name)
        try:
            iface = Interfaces(dp).configured()
            iif = min(iface)
            with IPRoute() as ipr:
                n, bad = verify(dp, dests, iif, bytes(iface[iif].mac), ipr)
        finally:
            dp.close()
    assert n == DESTS
    assert not bad, f"{len(bad)} of {n} differ, e.g. " + "; ".join(
        f"{m.dst}: kernel {m.kernel}, data plane {m.dataplane}" for m in bad[:5])


@pytest.mark.parametrize("version", [4, 6])
def test_fib_matches_kernel(router, version, tmp_path):
    lab = router
    rng = np.random.default_rng(1000 + version)
    routes = random_routes(rng, ROUTES[version], version, GATEWAYS[version])
    batch(lab, tmp_path, [r.ip_batch_line() for r in routes])
    check(lab, rng, routes, version)

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
    check(lab, rng, routes, version)
    proc = bpfrouter_cmd("verify", "--count", "200", "--seed", "7", "--name", lab.name)
    assert proc.returncode == 0 and "0 differ" in proc.stdout, proc.stdout + proc.stderr
