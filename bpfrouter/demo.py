"""`make demo`: a tour of bpfrouter on the built-in namespace lab.

Builds the lab, starts bpfrouter in the router namespace, sends real traffic
(ping and TCP, IPv4 and IPv6), and shows from the counters that XDP
redirected the packets while the kernel forwarded none of them; then what
happened to individual packets: events, a capture at the XDP hook, flows,
top, explain and metrics; last, a load-balanced service over three HTTP
backends, which keeps answering when one of them dies."""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter

from rich.console import Console
from rich.rule import Rule

from .lab import Lab

console = Console(highlight=False, emoji=False, soft_wrap=True)
LAB = "demo"
BACKENDS = 3
VIP = "10.0.100.1"


def sh(argv: list[str], show: bool = True, check: bool = True, display: list[str] | None = None,
       quiet: str | None = None) -> str:
    """quiet: stderr lines that start with it are not shown (a tool's banner)."""
    if show:
        console.print(f"[bold cyan]$ {shlex.join(display or argv)}[/]")
    proc = subprocess.run(argv, capture_output=True, text=True)
    err = proc.stderr if quiet is None else "".join(
        line for line in proc.stderr.splitlines(keepends=True) if not line.startswith(quiet))
    out = (proc.stdout + err).rstrip()
    if show and out:
        console.print(out, markup=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo step failed: {shlex.join(argv)}\n{out}")
    return proc.stdout


def bpfrouter(*args: str, show: bool = True) -> str:
    return sh([sys.executable, "-m", "bpfrouter", *args], show, display=["bpfrouter", *args])


def in_ns(lab: Lab, node: str, argv: list[str], show: bool = True, check: bool = True) -> str:
    return sh(["ip", "netns", "exec", lab.ns(node), *argv], show, check)


def iperf(lab: Lab, dst: str) -> str:
    server = subprocess.Popen(lab.cmd("h2", ["iperf3", "-s", "-1", "-B", dst]), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if in_ns(lab, "h2", ["ss", "-ltn"], show=False).count(":5201"):
                break
            time.sleep(0.1)
        console.print(f"[bold cyan]$ ip netns exec {lab.ns('h1')} iperf3 -c {dst} -t 2[/]")
        out = json.loads(in_ns(lab, "h1", ["iperf3", "-c", dst, "-t", "2", "-J"], show=False))
        bps = out["end"]["sum_received"]["bits_per_second"]
        sent = out["end"]["sum_received"]["bytes"]
        console.print(f"TCP {lab.addr('h1', 6 if ':' in dst else 4)} -> {dst}: "
                      f"{sent / 1e6:.0f} MB in 2 s, {bps / 1e9:.2f} Gbit/s")
    finally:
        server.kill()
    return ""


def background(*args: str) -> subprocess.Popen:
    """A streaming bpfrouter command, returned once it is listening."""
    console.print(f"[bold cyan]$ {shlex.join(['bpfrouter', *args])} &[/]")
    proc = subprocess.Popen([sys.executable, "-m", "bpfrouter", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    console.print(proc.stderr.readline().rstrip(), markup=False)
    return proc


def observe(lab: Lab) -> None:
    """Every packet's fate: events, capture at the XDP hook, flows, top, explain, metrics."""
    console.print(Rule("see every packet's fate (tcpdump runs after XDP: it never sees these)"))
    pcap = f"/tmp/bpfrouter-{LAB}.pcapng"
    events = background("events", "--name", LAB, "--count", "3", "--duration", "10", "--reason", "blackhole",
                        "--reason", "fib_miss")
    capture = background("capture", "--name", LAB, "-w", pcap, "--count", "6", "--duration", "10", "icmp")
    in_ns(lab, "h1", ["ping", "-c", "2", "-i", "0.2", "10.99.0.1"])                     # forwarded by XDP
    in_ns(lab, "h1", ["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.66.0.1"], check=False)  # blackhole: dropped
    in_ns(lab, "h1", ["ping", "-c", "1", "-W", "1", "198.51.100.1"], check=False)   # no route: to the kernel
    for proc in (events, capture):
        out, err = proc.communicate(timeout=30)
        for text in (out.rstrip(), err.rstrip()):
            if text:
                console.print(text, markup=False)
    if shutil.which("tshark"):
        sh(["tshark", "-r", pcap, "-T", "fields", "-e", "frame.interface_name", "-e", "ip.src", "-e", "ip.dst",
            "-e", "ip.ttl", "-e", "frame.comment"], quiet="Running as user")  # tshark's warning to root
    bpfrouter("flows", "--name", LAB, "--proto", "icmp", "--limit", "6")
    bpfrouter("explain", "tcp", f"{lab.addr('h1')}:40000", ">", "10.99.0.1:80", "iif", "r-eth0", "--name", LAB)
    bpfrouter("explain", "udp", f"{lab.addr('h1')}:5000", ">", "10.66.0.1:53", "--name", LAB)
    server = subprocess.Popen(lab.cmd("h2", ["iperf3", "-s", "-1", "-B", lab.addr("h2")]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    client = subprocess.Popen(lab.cmd("h1", ["iperf3", "-c", lab.addr("h2"), "-t", "3"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bpfrouter("top", "--name", LAB, "--count", "1", "--interval", "1", "--limit", "4")
    client.wait(timeout=30)
    server.kill()
    console.print("[bold cyan]$ bpfrouter metrics --once | grep redirect[/]")
    for line in bpfrouter("metrics", "--once", "--name", LAB, show=False).splitlines():
        if 'verdict="redirect"' in line and line.startswith("bpfrouter_packets_total"):
            console.print(line, markup=False)


def curl_spread(lab: Lab, n: int) -> Counter:
    """n HTTP requests from h1 to the VIP, each on a connection of its own, 50 at a time."""
    argv = ["curl", "-s", "--parallel", "--parallel-max", "50", "--max-time", "10", "-H", "Connection: close",
            f"http://{VIP}/[1-{n}]"]
    console.print(f"[bold cyan]$ ip netns exec {lab.ns('h1')} {shlex.join(argv)}[/]")
    got = Counter(in_ns(lab, "h1", argv, show=False, check=False).split())
    console.print(f"{sum(got.values())} of {n} requests answered: " +
                  ", ".join(f"{b} {got[b]}" for b in sorted(got)), markup=False)
    return got


def load_balance(lab: Lab) -> None:
    """A service over three HTTP backends: spread by weight, a backend's death."""
    console.print(Rule("load balancing: a VIP over three HTTP backends"))
    servers = {}
    for i in range(1, BACKENDS + 1):
        b = f"b{i}"
        in_ns(lab, b, ["ip", "addr", "add", f"{VIP}/32", "dev", "lo"], show=i == 1)
        bpfrouter("--netns", lab.ns(b), "decap", "attach", f"{b}-eth0", show=i == 1)
        servers[b] = subprocess.Popen(lab.cmd(b, [sys.executable, "-m", "bpfrouter.labhttp", "serve", b, "80"]),
                                      stdout=subprocess.PIPE, text=True)
        servers[b].stdout.readline()
    console.print("(each backend: the VIP on lo, the XDP decapsulation, an HTTP server answering its name)")
    key = ["tcp", f"{VIP}:80"]
    bpfrouter("service", "add", *key, "check", "http", "interval", "0.5", "fall", "2", "--name", LAB)
    for i, w in zip(range(1, BACKENDS + 1), (1, 1, 2)):
        bpfrouter("service", "backend", "add", *key, lab.addr(f"b{i}"), "weight", str(w), "--name", LAB)
    curl_spread(lab, 400)
    bpfrouter("service", "show", "--name", LAB)
    console.print(f"[bold cyan]$ kill the HTTP server of b{BACKENDS}[/]")
    servers.pop(f"b{BACKENDS}").kill()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:
        s = json.loads(bpfrouter("service", "show", "-j", "--name", LAB, show=False))[0]
        if any(b["state"] == "unhealthy" for b in s["backends"]):
            break
        time.sleep(0.05)
    console.print(f"the agent's health check marked it unhealthy after {time.monotonic() - t0:.1f} s "
                  f"(interval 0.5 s x fall 2)")
    curl_spread(lab, 200)
    bpfrouter("service", "log", "--name", LAB)
    for p in servers.values():
        p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", action="store_true", help="leave the lab and router up at the end")
    args = ap.parse_args()
    lab = Lab(LAB, BACKENDS)
    console.print(Rule("bpfrouter demo"))
    console.print("A lab of network namespaces: h1 -- router -- h2, on two IPv4/IPv6 subnets, and three "
                  "backend hosts behind the router.\n")
    bpfrouter("lab", "up", "--lab", LAB, "--backends", str(BACKENDS))
    try:
        console.print(Rule("start the router: XDP on the router's interfaces"))
        bpfrouter("--netns", lab.router_ns, "up", *(p for p, *_ in lab.router_ports()), "--name", LAB)
        console.print(Rule("real traffic across the router"))
        fwd0 = lab.kernel_forwarded()
        in_ns(lab, "h1", ["ping", "-c", "3", "-i", "0.2", lab.addr("h2")])
        in_ns(lab, "h1", ["ping", "-c", "3", "-i", "0.2", lab.addr("h2", 6)])
        iperf(lab, lab.addr("h2"))
        iperf(lab, lab.addr("h2", 6))
        console.print(Rule("what the XDP path did"))
        bpfrouter("status", "--name", LAB)
        st = json.loads(bpfrouter("status", "--name", LAB, "-j", show=False))
        kernel = lab.kernel_forwarded() - fwd0
        console.print(f"\n[bold green]{st['totals']['redirect']}[/] packets were forwarded by XDP "
                      f"(XDP_REDIRECT); the router's kernel forwarded [bold]{kernel}[/] "
                      f"(its ForwDatagrams counters in /proc/net/snmp and snmp6).")
        console.print("The first packet to each neighbor goes to the kernel ('no_neigh') so it resolves "
                      "the MAC; the rest take the fast path.\n")
        console.print(Rule("ask the data plane itself"))
        bpfrouter("route", "get", lab.addr("h2"), "--name", LAB)
        bpfrouter("route", "get", lab.addr("h2", 6), "--name", LAB)
        console.print(Rule("routes: from the kernel (any routing daemon) and from bpfrouter"))
        in_ns(lab, "h2", ["ip", "addr", "add", "10.99.0.1/32", "dev", "lo"], show=False)
        bpfrouter("route", "add", "10.99.0.0/16", "via", lab.addr("h2"), "--name", LAB)
        bpfrouter("route", "get", "10.99.0.1", "--name", LAB)
        in_ns(lab, "h1", ["ping", "-c", "2", "-i", "0.2", "10.99.0.1"])
        bpfrouter("route", "add", "blackhole", "10.66.0.0/16", "--name", LAB)
        bpfrouter("route", "show", "-4", "--name", LAB)
        observe(lab)
        load_balance(lab)
    finally:
        if args.keep:
            console.print(Rule("left running"))
            console.print(f"explore: bpfrouter status --name {LAB}; ip netns exec {lab.ns('h1')} ping {lab.addr('h2')}\n"
                          f"tear down: bpfrouter lab down --lab {LAB}")
        else:
            console.print(Rule("tear down"))
            bpfrouter("lab", "down", "--lab", LAB)


if __name__ == "__main__":
    main()
