"""Observability end to end, on real lab traffic through the real commands:
flows, events, capture (read back with tshark), explain, and Prometheus
metrics scraped from the agent and parsed with Prometheus's own parser."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bpfrouter import netns
from bpfrouter.capture import Capture
from bpfrouter.datapath import Datapath
from bpfrouter.lab import Lab
from tests.conftest import BPF_SKIP, ROOT, bpfrouter_cmd

from .conftest import METRICS_LISTEN, wait_for

BLACKHOLE = "10.0.99.0/24"


def stream(r, *args: str) -> subprocess.Popen:
    """A streaming command (events, capture) started in the background; returns
    once it has announced itself, so the traffic that follows is seen."""
    proc = subprocess.Popen([sys.executable, "-m", "bpfrouter", *args, "--name", r.name], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    assert "Ctrl-C" in first, f"{args[0]} did not start: {first}{proc.stderr.read() if proc.poll() else ''}"
    return proc


def test_flows_match_the_packets_sent(observed_router):
    r = observed_router
    assert r.ping("h1", r.lab.addr("h2"), count=5)
    got = r.json("flows", "--proto", "icmp", "--host", r.lab.addr("h2"), "--limit", "0")
    by_dir = {(f["src"], f["dst"]): f for f in got["flows"]}
    there, back = by_dir[(r.lab.addr("h1"), r.lab.addr("h2"))], by_dir[(r.lab.addr("h2"), r.lab.addr("h1"))]
    # every packet of the flow counts, also one passed to the kernel while the neighbor resolved
    assert there["packets"] == 5 and back["packets"] == 5
    assert there["bytes"] == 5 * 98 and there["iface"] == "r-eth0" and there["egress"] == "r-eth1"
    assert back["verdict"] == "redirect" and back["reason"] == "ipv4"
    assert got["table"]["capacity"] == 65536 and got["table"]["entries"] >= 2
    text = r.cli("flows", "--sort", "bytes").stdout
    assert f"{r.lab.addr('h1')}" in text and "redirect ipv4" in text


def test_events_stream_drops_and_passes_as_json_lines(observed_router):
    r = observed_router
    r.cli("route", "add", "blackhole", BLACKHOLE)
    try:
        proc = stream(r, "events", "-j", "--count", "2", "--duration", "15", "--reason", "blackhole",
                      "--reason", "fib_miss")
        r.lab.run("h1", ["ping", "-c", "1", "-W", "1", "10.0.99.7"])
        r.lab.run("h1", ["ping", "-c", "1", "-W", "1", "198.51.100.7"])
        out, _ = proc.communicate(timeout=30)
    finally:
        r.cli("route", "del", "blackhole", BLACKHOLE)
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["verdict"], e["reason"], e["dst"]) for e in events] == \
        [("drop", "blackhole", "10.0.99.7"), ("pass", "fib_miss", "198.51.100.7")]
    bh = events[0]
    assert bh["iface"] == "r-eth0" and bh["proto"] == "icmp" and bh["src"] == r.lab.addr("h1")
    assert bh["route"] == {"type": "blackhole", "prefix": BLACKHOLE, "proto": "bpfrouter"}
    bad = r.cli("events", "--reason", "nonsense", check=False)
    assert bad.returncode != 0 and "unknown reason 'nonsense'" in bad.stderr and "Traceback" not in bad.stderr


def test_capture_file_holds_forwarded_and_dropped_packets_with_verdicts(observed_router, tmp_path):
    r = observed_router
    path = tmp_path / "xdp.pcapng"
    r.cli("route", "add", "blackhole", BLACKHOLE)
    try:
        proc = stream(r, "capture", "-w", str(path), "--count", "6", "--duration", "15", "icmp")
        r.ping("h1", r.lab.addr("h2"), count=2)                       # 2 requests + 2 replies, redirected
        r.lab.run("h1", ["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.0.99.7"])   # dropped by XDP
        _, err = proc.communicate(timeout=30)
    finally:
        r.cli("route", "del", "blackhole", BLACKHOLE)
    assert "6 packets captured" in err
    tshark = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_name",
                             "-e", "ip.src", "-e", "ip.dst", "-e", "icmp.type", "-e", "frame.comment"],
                            capture_output=True, text=True, check=True)
    rows = [line.split("\t") for line in tshark.stdout.splitlines()]
    h1, h2 = r.lab.addr("h1"), r.lab.addr("h2")
    assert sorted(rows) == sorted([
        ["r-eth0", h1, h2, "8", "bpfrouter: redirect ipv4 xdp redirect egress r-eth1"],
        ["r-eth0", h1, h2, "8", "bpfrouter: redirect ipv4 xdp redirect egress r-eth1"],
        ["r-eth1", h2, h1, "0", "bpfrouter: redirect ipv4 xdp redirect egress r-eth0"],
        ["r-eth1", h2, h1, "0", "bpfrouter: redirect ipv4 xdp redirect egress r-eth0"],
        ["r-eth0", h1, "10.0.99.7", "8", "bpfrouter: drop blackhole xdp drop"],
        ["r-eth0", h1, "10.0.99.7", "8", "bpfrouter: drop blackhole xdp drop"],
    ])
    # the packets are the ones sent: TTL 64 as h1 sent it, before XDP decremented it
    ttls = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "ip.ttl", "-Y", f"ip.src == {h1}"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert ttls == ["64"] * 4
    bad = r.cli("capture", "--duration", "1", "port", "and", "and", check=False)
    assert bad.returncode != 0 and "bad filter" in bad.stderr and "Traceback" not in bad.stderr


def test_capture_swaps_the_program_in_and_out_under_traffic_without_losing_a_packet(observed_router):
    """20 swaps to the capture program and back while an echo flood runs from
    before the first to after the last; after each swap, 200 more echoes come
    back, so each program carried traffic. Every request must get its reply.
    Counted, not timed: a faster host swaps as often and floods longer."""
    r = observed_router
    r.ping("h1", r.lab.addr("h2"), count=1)  # the neighbor is resolved
    flood = r.lab.popen("h1", [sys.executable, str(ROOT / "tests" / "e2e" / "icmp_flood.py"), r.lab.addr("h2")],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def tell(command: str) -> str:
        flood.stdin.write(command + "\n")
        flood.stdin.flush()
        return flood.stdout.readline()

    def carried(n: int) -> bool:
        base = int(tell("count"))
        return wait_for(lambda: int(tell("count")) >= base + n, timeout=30)

    dp = Datapath.open(r.name)
    try:
        assert flood.stdout.readline().strip() == "started"
        for _ in range(20):
            cap = Capture(dp)
            cap.renew()   # both interfaces now run the program with the capture hook
            assert carried(200), "the flood stalled under the capture program"
            cap.stop()    # and the plain one again
            assert carried(200), "the flood stalled under the plain program"
        assert dp.capture_hooked() == []
        result = json.loads(tell("stop"))
    finally:
        dp.close()
        flood.kill()
        flood.wait()
    assert result["sent"] == result["received"] and result["duplicates"] == 0, result
    assert r.json("status")["observers"]["capture_hook_on"] == []


def test_agent_takes_the_capture_hook_back_when_the_reader_is_killed(observed_router):
    r = observed_router
    proc = stream(r, "capture", "--duration", "60", "icmp")
    assert sorted(r.json("status")["observers"]["capture_hook_on"]) == ["r-eth0", "r-eth1"]
    proc.kill()  # SIGKILL: no chance to swap the plain program back
    proc.wait()
    # the lease runs out after 3 s, the agent checks every second
    assert wait_for(lambda: r.json("status")["observers"]["capture_hook_on"] == [], timeout=10)
    assert r.ping("h1", r.lab.addr("h2"), count=1)


def test_explain_routed_dropped_local_and_passed(observed_router):
    r = observed_router
    h1, h2 = r.lab.addr("h1"), r.lab.addr("h2")
    r.ping("h1", h2, count=1)  # the neighbor is resolved

    def counted() -> dict:
        """What explain's packets would move if they were counted: the redirect
        and drop totals (background traffic, ND or ARP, is only ever passed),
        and each port's counters of the pass reasons they get."""
        st = r.json("status")
        passes = {(c["iface"], c["reason"]): c["packets"] for c in st["counters"]
                  if c["reason"] in ("local", "ttl_exceeded", "fib_miss")}
        return {"redirect": st["totals"]["redirect"], "drop": st["totals"]["drop"], **passes}

    before = counted()
    routed = r.json("explain", "tcp", f"{h1}:40000", ">", f"{h2}:80", "iif", "r-eth0")
    assert (routed["verdict"], routed["reason"], routed["egress"]) == ("redirect", "ipv4", "r-eth1")
    assert routed["parse"]["layers"] == ["ethernet", "ipv4", "tcp"] and routed["parse"]["tcp_flags"] == "S"
    assert routed["fib"]["prefix"] == "10.0.2.0/24" and routed["fib"]["table"] == "main"
    assert routed["nexthop"]["gateway"] is None and routed["nexthop"]["dev"] == "r-eth1"
    assert routed["neighbor"]["address"] == h2 and routed["neighbor"]["lladdr"]
    assert routed["output"]["ttl"] == 63
    back = r.json("explain", "icmp", h2, ">", h1, "iif", "r-eth1")
    assert (back["verdict"], back["reason"], back["egress"]) == ("redirect", "ipv4", "r-eth0")
    r.cli("route", "add", "blackhole", BLACKHOLE)
    try:
        dropped = r.json("explain", "udp", f"{h1}:5000", ">", "10.0.99.1:53")
        dropped_too = r.json("explain", "icmp", h2, ">", "10.0.99.7", "iif", "r-eth1")
    finally:
        r.cli("route", "del", "blackhole", BLACKHOLE)
    assert (dropped["verdict"], dropped["reason"], dropped["fib"]["type"]) == ("drop", "blackhole", "blackhole")
    assert (dropped_too["verdict"], dropped_too["reason"]) == ("drop", "blackhole")
    local = r.json("explain", "icmp", h1, ">", "10.0.1.1")
    assert (local["verdict"], local["reason"], local["fib"]["table"]) == ("pass", "local", "local")
    expiring = r.json("explain", "udp", f"{h1}:5000", ">", f"{h2}:53", "ttl", "1")
    assert (expiring["verdict"], expiring["reason"]) == ("pass", "ttl_exceeded")
    unrouted = r.json("explain", "udp", f"{h1}:5000", ">", "198.51.100.7:53")
    assert (unrouted["verdict"], unrouted["reason"]) == ("pass", "fib_miss")
    text = r.cli("explain", "icmp", h1, ">", h2).stdout
    assert "verdict  redirect" in text and "fib      BPF FIB (dir): table main, 10.0.2.0/24" in text
    assert counted() == before, "explain must not count its packets"
    # and those counters do count packets: a real echo and its reply are redirected
    assert r.ping("h1", h2, count=1) and counted()["redirect"] >= before["redirect"] + 2
    for bad, msg in ((["tcp", h1, ">", h2], "tcp needs ports"), (["sctp", h1, ">", h2], "unknown protocol"),
                     (["--hex", "zz"], "invalid hex"), ([], "give exactly one packet")):
        p = r.cli("explain", *bad, check=False)
        assert p.returncode != 0 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_metrics_endpoint_parses_and_counts(observed_router):
    r = observed_router
    assert r.ping("h1", r.lab.addr("h2"), count=1)  # the neighbor is resolved: the rest is redirected
    assert r.ping("h1", r.lab.addr("h2"), count=3)

    def scrape() -> str:
        with netns.entered(r.lab.router_ns):
            with urllib.request.urlopen(f"http://{METRICS_LISTEN}/metrics", timeout=10) as resp:
                return resp.read().decode()

    text = wait_for(lambda: _try(scrape), timeout=10)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("bpfrouter_packets", "bpfrouter_bytes", "bpfrouter_fib_routes", "bpfrouter_map_fill_ratio",
                 "bpfrouter_events", "bpfrouter_flows_evicted", "bpfrouter_program_runs", "bpfrouter_neighbors"):
        assert name in families, f"{name} missing from the scrape"
    assert families["bpfrouter_packets"].type == "counter"
    redirected = sum(s.value for s in families["bpfrouter_packets"].samples
                     if s.name == "bpfrouter_packets_total" and s.labels["verdict"] == "redirect"
                     and s.labels["interface"] == "r-eth0")
    st = r.json("status")
    assert redirected >= 3 and redirected <= st["totals"]["redirect"]
    fill = {s.labels["map"]: s.value for s in families["bpfrouter_map_fill_ratio"].samples}
    assert {"neighbors", "nexthops", "flows", "fib4", "fib6"} <= set(fill) and all(0 <= v <= 1 for v in fill.values())
    names = {s.name for f in families.values() for s in f.samples}
    dashboard = (ROOT / "docs" / "grafana" / "bpfrouter.json").read_text()
    used = set(re.findall(r"bpfrouter_[a-z_]+", dashboard)) - {"bpfrouter_"}
    assert used and used <= names, f"the Grafana dashboard queries metrics nobody exports: {used - names}"
    once = r.cli("metrics", "--once").stdout
    assert "bpfrouter_packets_total{" in once
    assert st["warnings"] == [] and st["maps"]["neighbors"]["capacity"] == 65536


def _try(f):
    try:
        return f()
    except OSError:
        return None


def test_router_without_observers_forwards_and_says_what_is_missing():
    if BPF_SKIP:
        pytest.skip(BPF_SKIP)
    name = f"e{os.getpid() % 10000}n"
    lab = Lab(name)
    lab.up()
    try:
        bad = bpfrouter_cmd("up", "r-eth0", "--name", name, "--observers", "flows,bogus", netns=lab.router_ns)
        assert bad.returncode != 0 and "invalid --observers" in bad.stderr
        bpfrouter_cmd("up", "r-eth0", "r-eth1", "--name", name, "--observers", "none", netns=lab.router_ns,
                      check=True)
        assert lab.run("h1", ["ping", "-c", "3", "-i", "0.2", lab.addr("h2")]).returncode == 0
        st = json.loads(bpfrouter_cmd("status", "--name", name, "-j", check=True).stdout)
        assert st["observers"]["enabled"] == [] and st["totals"]["redirect"] >= 4
        assert st["observers"]["flows_created"] == 0 and st["observers"]["events_sent"] == 0
        for cmd in ("flows", "events", "capture"):
            p = bpfrouter_cmd(cmd, "--name", name)
            assert p.returncode != 0 and "runs without the" in p.stderr, p.stderr
    finally:
        lab.down()


def test_explain_takes_the_description_as_one_quoted_argument(observed_router):
    r = observed_router
    h1, h2 = r.lab.addr("h1"), r.lab.addr("h2")
    assert r.ping("h1", h2, count=1)  # the neighbor is resolved
    one = r.json("explain", f"udp {h1}:4000 > {h2}:53 iif r-eth0")
    words = r.json("explain", "udp", f"{h1}:4000", ">", f"{h2}:53", "iif", "r-eth0")
    assert one == words and (one["verdict"], one["reason"], one["egress"]) == ("redirect", "ipv4", "r-eth1")
    p = r.cli("explain", f"sctp {h1} > {h2}", check=False)
    assert p.returncode != 0 and "unknown protocol 'sctp'" in p.stderr and "Traceback" not in p.stderr, p.stderr
