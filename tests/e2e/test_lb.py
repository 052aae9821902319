"""The load balancer end to end, in a lab with four backend hosts behind
the router: real HTTP servers (bpfrouter.labhttp) on the backends, which
hold the VIP on lo and decapsulate with bpfrouter's XDP decap (this
kernel has no ipip device), curl opening hundreds of connections from h1,
keep-alive connections held across changes, health checks by the agent.

- requests spread by weight (IPv4 and IPv6), in DSR and in NAT mode;
- a backend killed: once the agent marks it unhealthy, every new
  connection succeeds, and the connections held on the other backends
  keep working; it comes back when its server does;
- a backend added: every held connection stays where it was;
- uploads whose packets are over the MTU once encapsulated arrive whole:
  the router answers with ICMP from the VIP and the client's TCP lowers
  its segment size;
- an agent restart keeps services and connections;
- bad input is refused in one line, with nothing applied."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from bpfrouter.lab import Lab
from tests.conftest import BPF_SKIP, bpfrouter_cmd

from .conftest import LabRouter, wait_for

VIP, VIP6 = "10.0.100.1", "fd00:100::1"
BACKENDS = ["b1", "b2", "b3", "b4"]
REQUESTS = 400
CHECK = ["check", "http", "interval", "0.2", "timeout", "0.5", "rise", "2", "fall", "2"]


class LbLab:
    def __init__(self, lr: LabRouter):
        self.lr, self.lab = lr, lr.lab
        self.servers: dict[str, subprocess.Popen] = {}

    def addr(self, node, v=4):
        return self.lab.addr(node, v)

    def start_server(self, node: str) -> None:
        p = self.lab.popen(node, [sys.executable, "-m", "bpfrouter.labhttp", "serve", node, "80"],
                           stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
        assert p.stdout.readline().strip() == "listening"
        self.servers[node] = p

    def kill_server(self, node: str) -> None:
        p = self.servers.pop(node)
        p.kill()
        p.wait()

    def curl(self, url: str, n: int = REQUESTS, family: str = "-4") -> Counter:
        """n requests, each on a connection of its own, 100 at a time: the answers by backend."""
        p = self.lab.run("h1", ["curl", family, "-s", "--parallel", "--parallel-max", "100", "--max-time", "10",
                                "-H", "Connection: close", f"{url}/[1-{n}]"], timeout=120)
        return Counter(p.stdout.split())

    def hold(self, url: str, n: int) -> "Held":
        return Held(self.lab.popen("h1", [sys.executable, "-m", "bpfrouter.labhttp", "hold", url, str(n)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.getcwd()))

    def service(self, key: str) -> dict:
        return next(s for s in self.lr.json("service", "show") if s["service"] == key)

    def backend_state(self, key: str, addr: str) -> str:
        return next(b["state"] for b in self.service(key)["backends"] if b["address"] == addr)


class Held:
    """Keep-alive connections held open from h1 (labhttp hold)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.first = json.loads(proc.stdout.readline())

    def again(self) -> list[str]:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture(scope="module")
def lb_lab():
    if BPF_SKIP:
        pytest.skip(BPF_SKIP)
    name = f"l{os.getpid() % 10000}"
    lab = Lab(name, backends=len(BACKENDS))
    lab.up()
    try:
        # the backends answer from the VIP, to which the router has no route
        lab.run("r", ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"],
                check=True)
        ports = [f"r-eth{i}" for i in range(len(BACKENDS) + 2)]
        for p in ports:
            lab.run("r", ["sysctl", "-qw", f"net.ipv4.conf.{p}.rp_filter=0"], check=True)
        proc = bpfrouter_cmd("up", *ports, "--name", name, "--fib", "bpf", netns=lab.router_ns)
        assert proc.returncode == 0, proc.stderr
        ll = LbLab(LabRouter(lab, "bpf"))
        for b in BACKENDS:
            lab.run(b, ["ip", "addr", "add", f"{VIP}/32", "dev", "lo"], check=True)
            lab.run(b, ["ip", "addr", "add", f"{VIP6}/128", "dev", "lo"], check=True)
            out = bpfrouter_cmd("decap", "attach", f"{b}-eth0", netns=lab.ns(b))
            assert out.returncode == 0, out.stderr
            ll.start_server(b)
        yield ll
    finally:
        lab.down()


def add_service(ll: LbLab, key: list[str], weights: dict[str, int], v: int = 4) -> None:
    ll.lr.cli("service", "add", *key, *CHECK)
    for b, w in weights.items():
        ll.lr.cli("service", "backend", "add", *key, ll.addr(b, v), "weight", str(w))


def test_requests_spread_by_weight(lb_lab):
    ll = lb_lab
    key = "tcp 10.0.100.1:80"
    add_service(ll, ["tcp", f"{VIP}:80"], {"b1": 1, "b2": 2, "b3": 1})
    got = ll.curl(f"http://{VIP}")
    assert sum(got.values()) == REQUESTS, f"every request answered: {got}"
    assert set(got) <= {"b1", "b2", "b3"}
    for b, w in (("b1", 1), ("b2", 2), ("b3", 1)):
        assert abs(got[b] / REQUESTS - w / 4) <= 0.1, f"{b} (weight {w}) answered {got[b]} of {REQUESTS}"
    s = ll.service(key)
    assert s["stats"]["new_flows"] >= REQUESTS and s["table_size"] >= 100 * 3
    assert abs(s["max_over_avg_load"] - 1) < 0.05
    decap = json.loads(bpfrouter_cmd("decap", "show", "b2-eth0", "-j", netns=ll.lab.ns("b2")).stdout)
    assert decap["v4_in_v4"] >= got["b2"] and decap["failed"] == 0
    # explain names the backend the flow gets, and routes the outer packet to it
    flow = ["tcp", f"{ll.addr('h1')}:40000", ">", f"{VIP}:80", "iif", "r-eth0"]
    ex = ll.lr.json("explain", *flow)
    backends = {ll.addr(b): b for b in ("b1", "b2", "b3")}
    assert ex["lb"]["mode"] == "dsr" and ex["lb"]["backend"] in backends and ex["lb"]["encap"] == "IPIP", ex
    assert ex["fib"]["prefix"] == f"{ex['lb']['backend'].rsplit('.', 1)[0]}.0/24" and ex["parse"]["dport"] == 80
    assert f"lb       tcp {VIP}.80: backend {ex['lb']['backend']}, dsr (IPIP" in ll.lr.cli("explain", *flow).stdout
    # the router counts what it sent to each backend
    by_addr = {b["address"]: b["packets"] for b in s["backends"]}
    assert all(by_addr[ll.addr(b)] > 0 for b in ("b1", "b2", "b3"))


def test_ipv6_service(lb_lab):
    ll = lb_lab
    add_service(ll, ["tcp", f"[{VIP6}]:80"], {"b1": 1, "b2": 1, "b3": 1}, v=6)
    got = ll.curl(f"http://[{VIP6}]", n=200, family="-6")
    assert sum(got.values()) == 200 and len(got) == 3, got
    decap = json.loads(bpfrouter_cmd("decap", "show", "b1-eth0", "-j", netns=ll.lab.ns("b1")).stdout)
    assert decap["v6_in_v6"] >= got["b1"]
    ll.lr.cli("service", "del", "tcp", f"[{VIP6}]:80")


def test_gue_service(lb_lab):
    """encap gue: the same requests in GUE (UDP to the gue-port, the flow's
    hash in the source port), decapsulated on the backends by the same XDP
    program, IPv4 and IPv6."""
    ll = lb_lab
    vip, vip6 = "10.0.100.3", "fd00:100::3"
    lo_addrs = [(b, a) for b in ("b1", "b2") for a in (f"{vip}/32", f"{vip6}/128")]
    try:
        for b, a in lo_addrs:
            ll.lab.run(b, ["ip", "addr", "add", a, "dev", "lo"], check=True)
        for v, key, url, n in ((4, ["tcp", f"{vip}:80"], f"http://{vip}", 200),
                               (6, ["tcp", f"[{vip6}]:80"], f"http://[{vip6}]", 100)):
            before = {b: json.loads(bpfrouter_cmd("decap", "show", f"{b}-eth0", "-j", netns=ll.lab.ns(b)).stdout)
                      for b in ("b1", "b2")}
            ll.lr.cli("service", "add", *key, "encap", "gue", *CHECK)
            try:
                for b in ("b1", "b2"):
                    ll.lr.cli("service", "backend", "add", *key, ll.addr(b, v))
                got = ll.curl(url, n=n, family=f"-{v}")
                assert sum(got.values()) == n and set(got) == {"b1", "b2"}, got
                for b in ("b1", "b2"):
                    after = json.loads(bpfrouter_cmd("decap", "show", f"{b}-eth0", "-j", netns=ll.lab.ns(b)).stdout)
                    assert after["gue"] - before[b]["gue"] >= got[b], (b, before[b], after)
                assert ll.service(" ".join(key))["encap"] == "gue"
                assert f"{' '.join(key)}  dsr gue, table" in ll.lr.cli("service", "show").stdout
                ex = ll.lr.json("explain", "tcp", f"{ll.addr('h1', v)}:40000" if v == 4 else
                                f"[{ll.addr('h1', v)}]:40000", ">", key[1], "iif", "r-eth0")
                assert ex["lb"]["encap"].endswith("in GUE") and ex["lb"]["outer_ports"][1] == 6080, ex["lb"]
            finally:
                ll.lr.cli("service", "del", *key, check=False)
    finally:
        for b, a in lo_addrs:
            ll.lab.run(b, ["ip", "addr", "del", a, "dev", "lo"])


def test_uploads_over_the_encapsulated_mtu(lb_lab, tmp_path):
    """h1's segments fill its 1500-byte path, and the outer header makes
    them 20 (IPv4) or 40 (IPv6) bytes too long for the link to the
    backends: the router answers fragmentation needed / packet too big
    from the VIP, h1 lowers its path MTU to the VIP, and every upload
    arrives whole."""
    ll = lb_lab
    vip, vip6 = "10.0.100.2", "fd00:100::2"
    lo_addrs = [(b, a) for b in ("b1", "b2") for a in (f"{vip}/32", f"{vip6}/128")]
    body = tmp_path / "upload"
    body.write_bytes(os.urandom(300_000))
    try:
        for b, a in lo_addrs:
            ll.lab.run(b, ["ip", "addr", "add", a, "dev", "lo"], check=True)
        for v, key, url, mtu in ((4, ["tcp", f"{vip}:80"], f"http://{vip}/up", 1480),
                                 (6, ["tcp", f"[{vip6}]:80"], f"http://[{vip6}]/up", 1460)):
            add_service(ll, key, {"b1": 1, "b2": 1}, v=v)
            try:
                for _ in range(5):
                    p = ll.lab.run("h1", ["curl", f"-{v}", "-s", "--max-time", "20", "-H", "Expect:",
                                          "--data-binary", f"@{body}", url], timeout=60)
                    assert p.stdout.split()[1:] == ["300000"], f"IPv{v} upload: {p.stdout!r} {p.stderr!r}"
                s = ll.service(" ".join(key))
                assert s["stats"]["too_big"] >= 1, s["stats"]
                assert f"{s['stats']['too_big']} answered too big" in ll.lr.cli("service", "show").stdout
                route = ll.lab.run("h1", ["ip", f"-{v}", "route", "get", url.split("/")[2].strip("[]")],
                                   check=True).stdout
                assert f"mtu {mtu}" in route, route
            finally:
                ll.lr.cli("service", "del", *key, check=False)
    finally:
        for b, a in lo_addrs:
            ll.lab.run(b, ["ip", "addr", "del", a, "dev", "lo"])


def test_nat_service(lb_lab):
    """NAT mode: the backends see the router's address, answer it, and
    the router translates the answers back; no decapsulation involved."""
    ll = lb_lab
    vip = "10.0.100.2"
    ll.lr.cli("service", "add", "tcp", f"{vip}:80", "mode", "nat", *CHECK)
    for b in ("b1", "b2"):
        ll.lr.cli("service", "backend", "add", "tcp", f"{vip}:80", ll.addr(b))
    got = ll.curl(f"http://{vip}", n=200)
    assert sum(got.values()) == 200 and set(got) == {"b1", "b2"}, got
    s = ll.service(f"tcp {vip}:80")
    assert s["mode"] == "nat" and s["stats"]["replies"] >= 200 and s["stats"]["nat_port_busy"] == 0
    ex = ll.lr.json("explain", "tcp", f"{ll.addr('h1')}:40000", ">", f"{vip}:80", "iif", "r-eth0")
    lb = ex["lb"]
    assert lb["mode"] == "nat" and lb["backend"] in (ll.addr("b1"), ll.addr("b2")) and lb["backend_port"] == 80, ex
    assert lb["source"] == lb["backend"].rsplit(".", 1)[0] + ".1" and 1024 <= lb["source_port"] < 32768
    with ll.hold(f"http://{vip}", 20) as held:
        assert held.again() == held.first
    ll.lr.cli("service", "del", "tcp", f"{vip}:80")


def test_backend_death_and_return(lb_lab):
    ll = lb_lab
    key = "tcp 10.0.100.1:80"
    with ll.hold(f"http://{VIP}", 60) as held:
        assert set(held.first) == {"b1", "b2", "b3"}, held.first
        killed_at = time.monotonic()
        ll.kill_server("b3")
        assert wait_for(lambda: ll.backend_state(key, ll.addr("b3")) == "unhealthy", timeout=30, interval=0.05)
        detected = time.monotonic() - killed_at
        print(f"backend death detected in {detected:.2f} s (interval 0.2 s x fall 2, timeout 0.5 s)")
        # new connections: none fails, none reaches b3
        got = ll.curl(f"http://{VIP}", n=200)
        assert sum(got.values()) == 200 and "b3" not in got, got
        # held connections on the living backends are untouched
        now = held.again()
        for before, after in zip(held.first, now):
            if before != "b3":
                assert after == before, (before, after)
            else:
                assert after != "b3"
        ll.start_server("b3")
        assert wait_for(lambda: ll.backend_state(key, ll.addr("b3")) == "active", timeout=30, interval=0.05)
        assert "b3" in ll.curl(f"http://{VIP}", n=200)


def test_backend_added_keeps_connections(lb_lab):
    ll = lb_lab
    with ll.hold(f"http://{VIP}", 60) as held:
        ll.lr.cli("service", "backend", "add", "tcp", f"{VIP}:80", ll.addr("b4"), "weight", "4")
        s = ll.service("tcp 10.0.100.1:80")
        assert 0 < s["moved_last_change"] < 1
        assert held.again() == held.first, "an established connection moved"
        assert "b4" in ll.curl(f"http://{VIP}", n=100)
        # drained: held connections on it keep working, no new one goes there
        with ll.hold(f"http://{VIP}", 30) as held4:
            assert "b4" in held4.first
            ll.lr.cli("service", "backend", "drain", "tcp", f"{VIP}:80", ll.addr("b4"))
            assert held4.again() == held4.first
            assert "b4" not in ll.curl(f"http://{VIP}", n=100)


def definitions(services: list[dict]) -> list:
    """What a restart must keep of each service: its definition, its
    backends' states and their shares of the table."""
    return [(s["service"], s["mode"], s["table_size"], s["check"],
             [(b["address"], b["weight"], b["state"], b["share"]) for b in s["backends"]]) for s in services]


def test_agent_restart_keeps_services_and_connections(lb_lab):
    """Services, tables and health as the maps kept them: a backend that
    was unhealthy stays out of the table until its checks say otherwise."""
    ll = lb_lab
    key = "tcp 10.0.100.1:80"
    ll.kill_server("b2")
    assert wait_for(lambda: ll.backend_state(key, ll.addr("b2")) == "unhealthy", timeout=30, interval=0.05)
    with ll.hold(f"http://{VIP}", 30) as held:
        before = ll.lr.json("service", "show")
        ll.lr.cli("agent", "stop")
        ll.lr.cli("agent", "start")
        assert definitions(ll.lr.json("service", "show")) == definitions(before)
        assert held.again() == held.first
    ll.start_server("b2")
    assert wait_for(lambda: ll.backend_state(key, ll.addr("b2")) == "active", timeout=30, interval=0.05)


def test_bad_input_is_refused_in_one_line(lb_lab):
    ll = lb_lab
    before = ll.lr.json("service", "show")
    for args in (["service", "add", "tcp", f"{VIP}:80"],
                 ["service", "add", "sctp", f"{VIP}:80"],
                 ["service", "add", "tcp", "10.0.100.2:80", "check", "exec"],
                 ["service", "add", "tcp", "10.0.100.2:80", "table-size", "1000"],
                 ["service", "backend", "add", "tcp", f"{VIP}:80", "not-an-ip"],
                 ["service", "backend", "add", "tcp", f"{VIP}:80", "10.0.11.2"],
                 ["service", "backend", "weight", "tcp", f"{VIP}:80", "10.0.11.2", "-3"],
                 ["service", "backend", "del", "tcp", f"{VIP}:81", "10.0.11.2"],
                 ["service", "backend", "drain", "tcp", f"{VIP}:80", "10.0.11.2", "now"],
                 ["service", "add", "udp", "10.0.100.3:53", "mode", "nat"],
                 ["service", "del", "udp", f"{VIP}:80"],
                 ["service", "set", "encap-source", "10.0.0.0/33"]):
        p = ll.lr.cli(*args, check=False)
        assert p.returncode != 0 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, (args, p.stderr)
    assert definitions(ll.lr.json("service", "show")) == definitions(before)
