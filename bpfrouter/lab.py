"""The namespace lab: two hosts on different IPv4/IPv6 subnets and a router
between them, built from network namespaces and veth pairs.

    h1 (10.0.1.2, fd00:1::2) --h1-eth0 == r-eth0-- r --r-eth1 == h2-eth0-- h2 (10.0.2.2, fd00:2::2)

With backends (the load balancer's lab), each backend bN is a host of its
own behind the router: r-eth(N+1) == bN-eth0, bN at 10.0.(10+N).2 and
fd00:(10+N)::2.

Namespaces are named <lab>-h1, <lab>-r, <lab>-h2, so labs with different
names coexist. `up` first clears leftovers of a lab of the same name, and
`down` kills what still runs inside and removes everything, so both are safe
after a failed or interrupted run."""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass


from . import netns
from .agent.client import stop_agent
from .datapath import Datapath, DatapathError, RouterMeta, running_routers
from .lb.decap import forget_namespace

IFA_F_NODAD = 0x02

# node -> list of (ifname, peer node, peer ifname, [addresses])
TOPOLOGY = {
    "r": [("r-eth0", "h1", "h1-eth0", ["10.0.1.1/24", "fd00:1::1/64"]),
          ("r-eth1", "h2", "h2-eth0", ["10.0.2.1/24", "fd00:2::1/64"])],
}
HOSTS = {
    "h1": {"ifname": "h1-eth0", "addrs": ["10.0.1.2/24", "fd00:1::2/64"],
           "gateways": ["10.0.1.1", "fd00:1::1"]},
    "h2": {"ifname": "h2-eth0", "addrs": ["10.0.2.2/24", "fd00:2::2/64"],
           "gateways": ["10.0.2.1", "fd00:2::1"]},
}
NODES = ("h1", "r", "h2")
MAX_BACKENDS = 8


def backend_host(i: int) -> tuple[str, dict]:
    """Backend i (1-based): its node name and host entry."""
    return f"b{i}", {"ifname": f"b{i}-eth0", "addrs": [f"10.0.{10 + i}.2/24", f"fd00:{10 + i}::2/64"],
                     "gateways": [f"10.0.{10 + i}.1", f"fd00:{10 + i}::1"]}


class LabError(Exception):
    pass


def _sysctl(values: dict[str, str]) -> None:
    for key, value in values.items():
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)


@dataclass
class Lab:
    name: str = "lab"
    backends: int = 0           # backend hosts b1..bN (at most MAX_BACKENDS)

    def hosts(self) -> dict[str, dict]:
        return {**HOSTS, **dict(backend_host(i) for i in range(1, self.backends + 1))}

    def router_ports(self) -> list[tuple[str, str, str, list[str]]]:
        ports = list(TOPOLOGY["r"])
        for i in range(1, self.backends + 1):
            node, h = backend_host(i)
            ports.append((f"r-eth{i + 1}", node, h["ifname"], [g + ("/24" if "." in g else "/64")
                                                               for g in h["gateways"]]))
        return ports

    def nodes(self) -> list[str]:
        return [*NODES, *(f"b{i}" for i in range(1, self.backends + 1))]

    def ns(self, node: str) -> str:
        return f"{self.name}-{node}"

    @property
    def router_ns(self) -> str:
        return self.ns("r")

    def addr(self, node: str, version: int = 4) -> str:
        """The main address of a host (h1, h2, bN) for an IP version."""
        for a in self.hosts()[node]["addrs"]:
            ip = ipaddress.ip_interface(a).ip
            if ip.version == version:
                return str(ip)
        raise KeyError(node)

    def exists(self) -> bool:
        return any(netns.exists(self.ns(n)) for n in NODES)

    def up(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root: run it with sudo")
        if not 0 <= self.backends <= MAX_BACKENDS:
            raise LabError(f"a lab has 0 to {MAX_BACKENDS} backends")
        if len(self.router_ns) > 28 or not self.name.replace("-", "").replace("_", "").isalnum():
            raise LabError(f"invalid lab name {self.name!r}: use up to 25 letters, digits, '-' or '_'")
        self.down()
        try:
            self._build()
        except Exception:
            self.down()
            raise

    def _build(self) -> None:
        from pyroute2 import IPRoute  # (a second to import: not for every `bpfrouter` command)
        from pyroute2 import netns as pr_netns
        for node in self.nodes():
            pr_netns.create(self.ns(node))
            netns.run_in(self.ns(node), _sysctl, {
                "net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0",
                "net.ipv6.conf.default.accept_ra": "0",
            })
        netns.run_in(self.router_ns, _sysctl, {"net.ipv4.ip_forward": "1",
                                               "net.ipv6.conf.all.forwarding": "1"})
        if self.backends:
            # backends answer clients from the VIP, which the router has no route
            # back to: no reverse-path filter (the kernel takes max(all, port))
            netns.run_in(self.router_ns, _sysctl, {"net.ipv4.conf.all.rp_filter": "0",
                                                   "net.ipv4.conf.default.rp_filter": "0"})
        with IPRoute(netns=self.router_ns) as ipr:
            for ifname, peer_node, peer_ifname, addrs in self.router_ports():
                ipr.link("add", ifname=ifname, kind="veth",
                         peer={"ifname": peer_ifname, "net_ns_fd": self.ns(peer_node)})
                idx = ipr.link_lookup(ifname=ifname)[0]
                _add_addrs(ipr, idx, addrs)
                ipr.link("set", index=idx, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for host, cfg in self.hosts().items():
            with IPRoute(netns=self.ns(host)) as ipr:
                idx = ipr.link_lookup(ifname=cfg["ifname"])[0]
                _add_addrs(ipr, idx, cfg["addrs"])
                ipr.link("set", index=idx, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                for gw in cfg["gateways"]:
                    ipr.route("add", dst="::/0" if ":" in gw else "0.0.0.0/0", gateway=gw)
            # A veth accepts XDP-redirected frames only when its receive side
            # runs NAPI: GRO (or an XDP program) turns it on. And a host must
            # send complete checksums, as frames from a real NIC have: with TX
            # checksum offload a veth sends TCP/UDP with a partial checksum and
            # skb metadata that an XDP redirect does not carry across.
            self.run(host, ["ethtool", "-K", cfg["ifname"], "gro", "on", "tx", "off"], check=True)

    def down(self) -> None:
        for router in running_routers():
            try:
                meta = RouterMeta.load(router)
            except DatapathError:
                continue
            if meta.netns == self.router_ns:
                stop_agent(router)
                try:
                    Datapath.remove(router)
                except DatapathError:
                    pass
                shutil.rmtree(RouterMeta.path(router).parent, ignore_errors=True)
        # every backend a lab of this name may have had
        for node in [*NODES, *(f"b{i}" for i in range(1, MAX_BACKENDS + 1))]:
            ns = self.ns(node)
            for pid in netns.pids_in(ns):
                if pid != os.getpid():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if netns.exists(ns):
                from pyroute2 import netns as pr_netns
                forget_namespace(netns.path(ns))
                pr_netns.remove(ns)

    def link(self, node: str, ifname: str) -> tuple[int, bytes]:
        """(ifindex, MAC) of an interface of a node."""
        from pyroute2 import IPRoute
        with IPRoute(netns=self.ns(node)) as ipr:
            msg = ipr.link("get", index=ipr.link_lookup(ifname=ifname)[0])[0]
        return msg["index"], bytes.fromhex(msg.get_attr("IFLA_ADDRESS").replace(":", ""))

    def kernel_forwarded(self, node: str = "r") -> int:
        """Datagrams the node's kernel forwarded, IPv4 and IPv6 (ForwDatagrams):
        what proves whether XDP or the kernel forwarded a flow."""
        snmp = self.run(node, ["cat", "/proc/net/snmp"], check=True).stdout.splitlines()
        hdr, val = [line.split() for line in snmp if line.startswith("Ip:")][:2]
        snmp6 = dict(line.split() for line in self.run(node, ["cat", "/proc/net/snmp6"], check=True).stdout.splitlines())
        return int(val[hdr.index("ForwDatagrams")]) + int(snmp6["Ip6OutForwDatagrams"])

    def cmd(self, node: str, argv: list[str]) -> list[str]:
        return netns.command_prefix(self.ns(node)) + argv

    def run(self, node: str, argv: list[str], check: bool = False, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(node, argv), capture_output=True, text=True, check=check,
                              timeout=timeout, **kw)

    def popen(self, node: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(node, argv), **kw)


def _add_addrs(ipr, idx: int, addrs: list[str]) -> None:
    for a in addrs:
        iface = ipaddress.ip_interface(a)
        kw = {"flags": IFA_F_NODAD} if iface.version == 6 else {}
        ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, **kw)


def list_labs() -> list[str]:
    try:
        names = set(os.listdir(netns.NETNS_RUN_DIR))
    except FileNotFoundError:
        return []
    return sorted(n[:-2] for n in names if n.endswith("-r") and f"{n[:-2]}-h1" in names)
