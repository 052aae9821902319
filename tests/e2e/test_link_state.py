"""Link state: the fast path answers what the kernel answers when a link goes
down or up, loses its carrier, loses an address, or disappears.

The kernel changes routes on these without telling: IPv4 flushes the routes
of a link set down, or of one that loses its last address, with no
RTM_DELROUTE, and a lost carrier only flags next hops linkdown (dead, and
skipped, with ignore_routes_with_linkdown). Every check compares
`bpfrouter route get` with `ip route get` in the router's namespace, for
IPv4 and IPv6, after waiting for them to agree; each also pins which route the
kernel chose, so a check cannot pass with both answers stuck on the old one.

Two routes per family: metric 10 via r-eth1 (h2's side) and metric 100 via
r-eth0 (h1's side)."""
import json

import pytest

from .conftest import wait_for

PREFIX = {4: "10.99.0.0/16", 6: "fd99::/64"}
DST = {4: "10.99.1.1", 6: "fd99::1"}
VIA_ETH1 = {4: "10.0.2.2", 6: "fd00:2::2"}
VIA_ETH0 = {4: "10.0.1.2", 6: "fd00:1::2"}
R_ETH1_ADDR = {4: "10.0.2.1/24", 6: "fd00:2::1/64"}
PRIMARY = ("r-eth1", VIA_ETH1)
BACKUP = ("r-eth0", VIA_ETH0)


def kernel_answer(lab, dst: str):
    """`ip route get` in the router: (egress, gateway), or the error."""
    proc = lab.run("r", ["ip", "-j", "route", "get", dst])
    if proc.returncode != 0:
        return "unreachable" if "unreachable" in proc.stderr else proc.stderr.strip()
    got = json.loads(proc.stdout)[0]
    return got.get("dev"), got.get("gateway")


def dataplane_answer(r, dst: str):
    """`bpfrouter route get`, from the loaded program and its maps."""
    got = r.json("route", "get", dst)
    if got["egress"] is None:
        return "unreachable" if got["reason"] == "fib_miss" else got["reason"]
    return got["egress"], (got["nexthop"] or {}).get("gateway")


def agree(r, dst: str, expected) -> None:
    """The kernel answers `expected` and the data plane comes to the same answer."""
    assert kernel_answer(r.lab, dst) == expected, "the kernel chose otherwise; the test's premise is wrong"
    seen = []

    def same() -> bool:
        seen.append(dataplane_answer(r, dst))
        return seen[-1] == expected

    assert wait_for(same, timeout=15), f"{dst}: kernel {expected}, data plane {seen[-1]}"


def choice(which, version: int):
    dev, gw = which
    return dev, gw[version]


def add_routes(lab, versions=(4, 6)) -> None:
    for v in versions:
        for dev, gws, metric in ((PRIMARY[0], PRIMARY[1], 10), (BACKUP[0], BACKUP[1], 100)):
            lab.run("r", ["ip", f"-{v}", "route", "replace", PREFIX[v], "via", gws[v], "dev", dev,
                          "metric", str(metric)], check=True)


def del_routes(lab) -> None:
    for v in (4, 6):
        lab.run("r", ["ip", f"-{v}", "route", "flush", PREFIX[v]])


def sysctl(lab, key: str, value: int) -> None:
    lab.run("r", ["sysctl", "-qw", f"{key}={value}"], check=True)


def restore_r_eth1(lab) -> None:
    """r-eth1 up with its addresses, as the lab builds it (an IPv6 address
    set down is gone: the kernel drops it unless keep_addr_on_down)."""
    lab.run("h2", ["ip", "link", "set", "h2-eth0", "up"], check=True)
    lab.run("r", ["ip", "link", "set", "r-eth1", "up"], check=True)
    lab.run("r", ["ip", "addr", "replace", R_ETH1_ADDR[4], "dev", "r-eth1"], check=True)
    lab.run("r", ["ip", "-6", "addr", "replace", R_ETH1_ADDR[6], "dev", "r-eth1", "nodad"], check=True)
    for v in (4, 6):
        sysctl(lab, f"net.ipv{v}.conf.r-eth1.ignore_routes_with_linkdown", 0)


@pytest.fixture
def routes(bpf_router):
    r = bpf_router
    add_routes(r.lab)
    for v in (4, 6):
        agree(r, DST[v], choice(PRIMARY, v))
    yield r
    del_routes(r.lab)
    restore_r_eth1(r.lab)


def kernel_route_flags(lab, version: int, via: str) -> list[str]:
    out = json.loads(lab.run("r", ["ip", "-j", f"-{version}", "route", "show", PREFIX[version]],
                             check=True).stdout)
    return next((x.get("flags", []) for x in out if x.get("gateway") == via), None)


@pytest.mark.parametrize("version", [4, 6])
def test_link_down_then_up(routes, version):
    r, lab = routes, routes.lab
    lab.run("r", ["ip", "link", "set", "r-eth1", "down"], check=True)
    # IPv4: flushed without a notification; IPv6: deleted with one
    agree(r, DST[version], choice(BACKUP, version))
    agree(r, VIA_ETH1[version], "unreachable")
    lab.run("r", ["ip", "link", "set", "r-eth1", "up"], check=True)
    # the flushed route does not come back: the backup still carries the prefix
    agree(r, DST[version], choice(BACKUP, version))
    if version == 4:  # the connected route does come back (IPv6's address is gone)
        agree(r, VIA_ETH1[4], ("r-eth1", None))
    restore_r_eth1(lab)
    add_routes(lab, (version,))
    agree(r, DST[version], choice(PRIMARY, version))


@pytest.mark.parametrize("version", [4, 6])
def test_carrier_loss(routes, version):
    r, lab = routes, routes.lab
    lab.run("h2", ["ip", "link", "set", "h2-eth0", "down"], check=True)
    # linkwatch flags the next hops a little later; wait for the kernel, not a time
    assert wait_for(lambda: "linkdown" in kernel_route_flags(lab, version, VIA_ETH1[version]), timeout=15)
    # a linkdown next hop is still the kernel's choice while ignore_routes_with_linkdown is 0
    agree(r, DST[version], choice(PRIMARY, version))
    # the sysctl alone (a netconf notification, no route or link event) makes it dead
    sysctl(lab, f"net.ipv{version}.conf.r-eth1.ignore_routes_with_linkdown", 1)
    agree(r, DST[version], choice(BACKUP, version))
    lab.run("h2", ["ip", "link", "set", "h2-eth0", "up"], check=True)
    assert wait_for(lambda: "linkdown" not in kernel_route_flags(lab, version, VIA_ETH1[version]), timeout=15)
    agree(r, DST[version], choice(PRIMARY, version))
    # and with the sysctl set before: the carrier's loss alone
    lab.run("h2", ["ip", "link", "set", "h2-eth0", "down"], check=True)
    assert wait_for(lambda: "dead" in kernel_route_flags(lab, version, VIA_ETH1[version]), timeout=15)
    agree(r, DST[version], choice(BACKUP, version))
    lab.run("h2", ["ip", "link", "set", "h2-eth0", "up"], check=True)
    assert wait_for(lambda: "linkdown" not in kernel_route_flags(lab, version, VIA_ETH1[version]), timeout=15)
    agree(r, DST[version], choice(PRIMARY, version))


def test_address_removed(routes):
    r, lab = routes, routes.lab
    # r-eth1's only IPv4 address: its connected route goes (with a notification)
    # and so do the routes via its gateways (without one)
    lab.run("r", ["ip", "addr", "del", R_ETH1_ADDR[4], "dev", "r-eth1"], check=True)
    agree(r, VIA_ETH1[4], "unreachable")
    agree(r, DST[4], choice(BACKUP, 4))
    # IPv6: the connected route goes; the route via fd00:2::2 stays, and is used
    lab.run("r", ["ip", "-6", "addr", "del", R_ETH1_ADDR[6], "dev", "r-eth1"], check=True)
    agree(r, VIA_ETH1[6], "unreachable")
    agree(r, DST[6], choice(PRIMARY, 6))


def test_link_deleted(bpf_router):
    """A link that is not attached to the router: its routes still count, and
    deleting it flushes its IPv4 routes silently."""
    r, lab = bpf_router, bpf_router.lab
    lab.run("r", ["ip", "link", "add", "r-extra", "type", "veth", "peer", "name", "r-extra-p"], check=True)
    try:
        for cmd in (["ip", "addr", "add", "10.0.9.1/24", "dev", "r-extra"],
                    ["ip", "link", "set", "r-extra-p", "up"], ["ip", "link", "set", "r-extra", "up"],
                    ["ip", "route", "add", PREFIX[4], "via", "10.0.9.2", "metric", "10"],
                    ["ip", "route", "add", PREFIX[4], "via", VIA_ETH0[4], "metric", "100"]):
            lab.run("r", cmd, check=True)
        agree(r, DST[4], ("r-extra", "10.0.9.2"))
        lab.run("r", ["ip", "link", "del", "r-extra"], check=True)
        agree(r, DST[4], choice(BACKUP, 4))
    finally:
        lab.run("r", ["ip", "link", "del", "r-extra"])
        lab.run("r", ["ip", "route", "flush", PREFIX[4]])


def test_dead_bpfrouter_route_can_be_deleted(routes):
    """A dead route is in the kernel, not in the mirror: `route del` still finds it."""
    r, lab = routes, routes.lab
    sysctl(lab, "net.ipv4.conf.r-eth1.ignore_routes_with_linkdown", 1)
    lab.run("h2", ["ip", "link", "set", "h2-eth0", "down"], check=True)
    assert wait_for(lambda: "dead" in kernel_route_flags(lab, 4, VIA_ETH1[4]), timeout=15)
    r.cli("route", "add", "10.98.0.0/16", "via", VIA_ETH1[4])
    assert "dead" in lab.run("r", ["ip", "route", "show", "10.98.0.0/16"], check=True).stdout
    agree(r, "10.98.1.1", "unreachable")
    r.cli("route", "del", "10.98.0.0/16")
    assert lab.run("r", ["ip", "route", "show", "10.98.0.0/16"], check=True).stdout == ""
