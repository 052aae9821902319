"""Generic BPF_PROG_TEST_RUN harness for the data plane (Katran-style
fixture tables: description, input packet, expected verdict and reason,
check on the output packet).

One network namespace holds three veth pairs:
    dpt0 (ingress, attached)  dpt1 (egress, attached, MTU 1400)  dpt2 (not attached)
The same routes and neighbors are installed in the namespace's kernel FIB
(through `ip`) and in the BPF FIB (through the agent's own writers), so
every case runs against both FIB modes."""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
from dataclasses import dataclass
from typing import Callable, Iterator

from bpfrouter import netns
from bpfrouter.agent.rtnl import Decoder, RouteMonitor, dump_routes
from bpfrouter.datapath import Datapath
from bpfrouter.datapath import layout as lo
from bpfrouter.ecmp import mirror_hash_config
from bpfrouter.fib import Fib, Nexthop, Route, RouteType
from bpfrouter.interfaces import Interfaces
from bpfrouter.neighbors import Neighbors
from bpfrouter.observe import read_counters
from bpfrouter.packet import mac_str
from tests.kernelfib import KernelFib

NS = f"bpfr-dpt-{os.getpid()}"
MAC_GW = "02:00:00:00:00:02"
MAC_GW6 = "02:00:00:00:00:06"
MAC_H9 = "02:00:00:00:00:09"
MAC_UNMANAGED = "02:00:00:00:00:33"
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)

SETUP = [
    "link add dpt0 type veth peer name dpt0p",
    "link add dpt1 type veth peer name dpt1p",
    "link add dpt2 type veth peer name dpt2p",
    "link set dpt1 mtu 1400",
    *[f"link set {d} up" for d in ("lo", "dpt0", "dpt0p", "dpt1", "dpt1p", "dpt2", "dpt2p")],
    "addr add 10.1.0.1/24 dev dpt0", "addr add 10.2.0.1/24 dev dpt1", "addr add 10.3.0.1/24 dev dpt2",
    "addr add fd01::1/64 dev dpt0 nodad", "addr add fd02::1/64 dev dpt1 nodad",
    f"neigh add 10.2.0.2 lladdr {MAC_GW} dev dpt1 nud permanent",
    f"neigh add 10.2.0.3 lladdr {MAC_GW} dev dpt1 nud permanent",
    f"neigh add 10.2.0.9 lladdr {MAC_H9} dev dpt1 nud permanent",
    f"neigh add 10.3.0.2 lladdr {MAC_UNMANAGED} dev dpt2 nud permanent",
    f"neigh add fd02::2 lladdr {MAC_GW6} dev dpt1 nud permanent",
    "route add 10.20.0.0/16 via 10.2.0.2 dev dpt1",
    "route add 10.30.0.0/16 via 10.3.0.2 dev dpt2",
    "route add 10.40.0.0/16 nexthop via 10.2.0.2 dev dpt1 nexthop via 10.2.0.3 dev dpt1",
    "route add blackhole 10.66.0.0/16",
    "route add unreachable 10.67.0.0/16",
    "route add prohibit 10.68.0.0/16",
    "route add fd20::/32 via fd02::2 dev dpt1",
    "route add blackhole fd66::/32",
]


# data planes under test: (name, FIB mode, BPF FIB structure)
MODES = [("bpf", lo.FibMode.BPF, lo.FibImpl.DIR), ("lpm", lo.FibMode.BPF, lo.FibImpl.LPM),
         ("kernel", lo.FibMode.KERNEL, lo.FibImpl.LPM)]


def ip(*args: str) -> None:
    subprocess.run(["ip", "-n", NS, *args], check=True, capture_output=True, text=True)


@dataclass
class Env:
    dps: dict[str, Datapath]
    ifindex: dict[str, int]
    mac: dict[str, bytes]
    object_path: str

    @property
    def if0_mac(self) -> str:
        return mac_str(self.mac["dpt0"])

    @property
    def if1_mac(self) -> str:
        return mac_str(self.mac["dpt1"])


def fixture_routes(ifx: dict[str, int]) -> list[Route]:
    """The routes every harness data plane is loaded with (those of SETUP)."""
    n = ipaddress.ip_network
    a = ipaddress.ip_address
    U = RouteType.UNICAST
    return [
        Route(n("10.2.0.0/24"), U, (Nexthop(ifx["dpt1"]),)),
        Route(n("10.3.0.0/24"), U, (Nexthop(ifx["dpt2"]),)),
        Route(n("10.20.0.0/16"), U, (Nexthop(ifx["dpt1"], a("10.2.0.2")),)),
        Route(n("10.30.0.0/16"), U, (Nexthop(ifx["dpt2"], a("10.3.0.2")),)),
        Route(n("10.40.0.0/16"), U, (Nexthop(ifx["dpt1"], a("10.2.0.2")), Nexthop(ifx["dpt1"], a("10.2.0.3")))),
        Route(n("10.1.0.1/32"), RouteType.LOCAL),
        Route(n("10.66.0.0/16"), RouteType.BLACKHOLE),
        Route(n("10.67.0.0/16"), RouteType.UNREACHABLE),
        Route(n("10.68.0.0/16"), RouteType.PROHIBIT),
        Route(n("fd02::/64"), U, (Nexthop(ifx["dpt1"]),)),
        Route(n("fd20::/32"), U, (Nexthop(ifx["dpt1"], a("fd02::2")),)),
        Route(n("fd01::1/128"), RouteType.LOCAL),
        Route(n("fd66::/32"), RouteType.BLACKHOLE),
    ]


def setup_env(object_path: str) -> Env:
    teardown_env()
    subprocess.run(["ip", "netns", "add", NS], check=True)
    for cmd in SETUP:
        ip(*cmd.split())
    netns.run_in(NS, _sysctls)
    with netns.entered(NS):
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            links = {m.get_attr("IFLA_IFNAME"): m for m in ipr.link("dump")}
        ifindex = {n: m["index"] for n, m in links.items()}
        mac = {n: bytes.fromhex(m.get_attr("IFLA_ADDRESS").replace(":", "")) for n, m in links.items()}
        dps = {mode: load_datapath(f"{NS}-{mode}", object_path, fib_mode, impl, ifindex, mac)
               for mode, fib_mode, impl in MODES}
    return Env(dps, ifindex, mac, object_path)


def load_datapath(name: str, object_path: str, fib_mode: lo.FibMode, impl: lo.FibImpl, ifindex: dict[str, int],
                  mac: dict[str, bytes], **load_args) -> Datapath:
    """A data plane in the harness namespace (the caller is inside it) with the
    fixture interfaces, routes and neighbors."""
    dp = Datapath.load(name, object_path, fib_mode, impl, **{"groups": (256, 1024), **load_args})
    try:
        ifaces = Interfaces(dp)
        for d, mtu in (("dpt0", 1500), ("dpt1", 1400)):
            ifaces.configure(ifindex[d], mac[d], mtu)
        mirror_hash_config(dp)
        if fib_mode == lo.FibMode.BPF:
            fib = Fib(dp)
            for r in fixture_routes(ifindex):
                fib.update(r)
            fib.close()
            nb = Neighbors(dp)
            for addr, m, dev in (("10.2.0.2", MAC_GW, "dpt1"), ("10.2.0.3", MAC_GW, "dpt1"),
                                 ("10.2.0.9", MAC_H9, "dpt1"), ("10.3.0.2", MAC_UNMANAGED, "dpt2"),
                                 ("fd02::2", MAC_GW6, "dpt1")):
                nb.set(ifindex[dev], ipaddress.ip_address(addr), bytes.fromhex(m.replace(":", "")), 0x80)
    except BaseException:  # a failed fixture must not leave a pinned router behind
        dp.destroy()
        raise
    return dp


@contextlib.contextmanager
def own_datapath(env: Env, name: str, impl: lo.FibImpl = lo.FibImpl.DIR, **load_args) -> Iterator[Datapath]:
    """A BPF-FIB router of the test's own beside the shared ones (load_args as
    Datapath.load takes them: groups, observe...), destroyed afterwards."""
    with netns.entered(NS):
        dp = load_datapath(f"{NS}-{name}", env.object_path, lo.FibMode.BPF, impl, env.ifindex, env.mac, **load_args)
    try:
        yield dp
    finally:
        dp.destroy()


ROUTE_TYPES = {"unicast": RouteType.UNICAST, "blackhole": RouteType.BLACKHOLE,
               "unreachable": RouteType.UNREACHABLE, "prohibit": RouteType.PROHIBIT}


def kernel_route(env: Env, prefix, kind: str, gateway: str | None, metric: int = 1024, table: int = 254) -> Route:
    """A route as the namespace's kernel reports it (proto boot), by type name;
    a unicast one goes out of dpt1 through `gateway`."""
    hops = (Nexthop(env.ifindex["dpt1"], ipaddress.ip_address(gateway)),) if kind == "unicast" else ()
    return Route(prefix, ROUTE_TYPES[kind], hops, proto=3, metric=metric, table=table)


def _sysctls():
    for key in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
        with open(f"/proc/sys/{key}", "w") as f:
            f.write("1")
    # A new namespace copies init_net's rp_filter (2 where systemd sets it); the
    # fixture's sources have no route back in the BPF FIB, so the filter is off.
    for dev in ("all", "default", "dpt0", "dpt1", "dpt2"):
        if os.path.exists(f"/proc/sys/net/ipv4/conf/{dev}"):    # a KernelRib has dpt1 alone
            with open(f"/proc/sys/net/ipv4/conf/{dev}/rp_filter", "w") as f:
                f.write("0")


def teardown_env(env: Env | None = None) -> None:
    for mode, _, _ in MODES:
        try:
            Datapath.open(f"{NS}-{mode}").destroy()
        except Exception:
            pass
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)


@dataclass
class Result:
    action: int
    reason: lo.Reason | None
    out: bytes


def run_packet(env: Env, mode: str, frame: bytes, iif: str = "dpt0") -> Result:
    """Run one frame through the program; the reason is read from the counters
    the program incremented, so counting is checked on every case."""
    dp = env.dps[mode]
    with netns.entered(NS):
        before = read_counters(dp, env.ifindex[iif])
        res = dp.program.test_run(frame, ingress_ifindex=env.ifindex[iif])
        after = read_counters(dp, env.ifindex[iif])
    changed = [(k, after[k][0] - before.get(k, (0, 0))[0], after[k][1] - before.get(k, (0, 0))[1])
               for k in after if after[k] != before.get(k)]
    assert len(changed) == 1, f"expected exactly one counter to move, got {changed}"
    (ifindex, reason), dpk, dby = changed[0]
    assert ifindex == env.ifindex[iif] and dpk == 1 and dby == len(frame), changed
    return Result(res.retval, reason, res.data)


@dataclass
class Case:
    desc: str
    frame: Callable[[Env], bytes]
    bpf: tuple[int, str]             # (XDP action, reason name) with the BPF FIB (dir or lpm)
    kernel: tuple[int, str] | None = None   # same in kernel mode; None: same as bpf
    check: Callable[[Env, bytes], None] | None = None

    def expect(self, mode: str) -> tuple[int, str]:
        return self.bpf if mode != "kernel" or self.kernel is None else self.kernel


@dataclass(frozen=True)
class KRoute:
    """A route as a test installs it into a kernel FIB with `ip`."""
    prefix: ipaddress.IPv4Network | ipaddress.IPv6Network
    kind: str = "unicast"         # unicast (via gateway), local, blackhole, unreachable, prohibit
    gateway: str | None = None
    metric: int | None = None     # None: ip's default (0 for IPv4, 1024 for IPv6)
    table: str = "main"

    def line(self, verb: str = "add") -> str:
        """One `ip -batch` line (the family follows from the prefix)."""
        words = ["route", verb, self.kind, str(self.prefix)]
        if self.kind == "unicast":
            words += ["via", self.gateway]
        elif self.kind == "local":
            words += ["dev", "dpt1"]  # AnyIP: the whole prefix is the router's own
        metric = self.metric if self.metric is not None else (0 if self.prefix.version == 4 else 1024)
        return " ".join(words + ["metric", str(metric), "table", self.table])


class KernelRib:
    """A network namespace of its own whose kernel FIB is a test's RIB, as on a
    router: the test changes routes there with `ip`, a Fib mirrors what the
    kernel reports (its dump and its notifications, through the agent's own
    netlink reader), and the kernel answers which route a destination takes.

    It holds one veth, dpt1, with the ifindex of the harness's dpt1, so its
    routes' next hops are ones the harness's data planes know, and only
    routes to the gateways' subnets (10.2.0.0/24, fd02::/64 dev dpt1): no
    address, no loopback, so every route in it is the test's."""

    def __init__(self, env: Env, name: str):
        self.ns = f"{NS}-{name}"
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        try:
            self.ip("link", "add", "dpt1", "index", str(env.ifindex["dpt1"]), "type", "veth", "peer", "name", "dpt1p")
            netns.run_in(self.ns, _router_sysctls)
            self.ip("link", "set", "dpt1", "up")
            self.ip("link", "set", "dpt1p", "up")
            self.ip("route", "add", "10.2.0.0/24", "dev", "dpt1")
            self.ip("route", "add", "fd02::/64", "dev", "dpt1")
            self.decoder = Decoder()
            with netns.entered(self.ns):
                self.monitor = RouteMonitor(64 << 20)
            self.fib = KernelFib(self.ns)
        except BaseException:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
            raise

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.ns, *args], check=True, capture_output=True, text=True)

    def batch(self, lines: list[str]) -> None:
        """Apply `ip -batch` lines; the first the kernel refuses fails the test."""
        p = subprocess.run(["ip", "-n", self.ns, "-batch", "-"], input="\n".join(lines) + "\n",
                           capture_output=True, text=True)
        assert p.returncode == 0, f"the kernel refused a route: {p.stderr.strip()}"

    def events(self) -> list:
        """The route notifications since the last call, decoded as the agent's
        monitor decodes them: (new, NLM_F_REPLACE, Route or None). They are
        queued before `ip` returns, so nothing is waited for."""
        out: list = []
        while self.monitor.read(self.decoder, out, 0, 1 << 20):
            pass
        return out

    def dump(self) -> list[Route]:
        """A full dump, as the agent reads it on start and after an overrun."""
        return netns.run_in(self.ns, dump_routes, self.decoder)

    def prefixes(self) -> dict:
        """The prefixes of the main and local tables (the agent mirrors every
        type: those the fast path does not implement as passed to the kernel),
        each with its number of routes, as iproute2 lists them (not through
        the agent's decoder)."""
        out: dict = {}
        for family in ("-4", "-6"):
            p = subprocess.run(["ip", "-n", self.ns, "-j", family, "route", "show", "table", "all"],
                               check=True, capture_output=True, text=True)
            for r in json.loads(p.stdout):
                if r.get("table", "main") in ("main", "local"):
                    dst = r["dst"] if r["dst"] != "default" else ("0.0.0.0/0" if family == "-4" else "::/0")
                    net = ipaddress.ip_network(dst)
                    if r.get("type") == "multicast" and net.is_multicast:
                        continue  # its destinations are passed before any lookup: not mirrored
                    out[net] = out.get(net, 0) + 1
        return dict(sorted(out.items(), key=lambda t: (t[0].version, int(t[0].network_address), t[0].prefixlen)))

    def close(self) -> None:
        self.fib.close()
        self.monitor.close()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


def _router_sysctls():
    _sysctls()
    # no link-local address (and no fe80::/64 route) on dpt1 and its peer
    for dev in ("dpt1", "dpt1p"):
        with open(f"/proc/sys/net/ipv6/conf/{dev}/addr_gen_mode", "w") as f:
            f.write("1")


@contextlib.contextmanager
def kernel_rib(env: Env, name: str) -> Iterator[KernelRib]:
    k = KernelRib(env, name)
    try:
        yield k
    finally:
        k.close()
