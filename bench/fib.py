#!/usr/bin/env python3
"""FIB benchmark (`make bench-fib`, `ARGS=--json`, `ARGS=--quick`).

In one run, on one machine:
  - lookups inside the kernel over >= 1M distinct random destinations that
    hit the table, for Internet-shaped tables of 1k, 100k and 1M IPv4 and
    230k IPv6 prefixes: the DIR FIB next to the LPM trie, bpf_fib_lookup on
    the kernel FIB loaded with the same routes, and an empty loop (the floor);
  - the whole XDP pipeline per packet with those tables and varying
    destinations;
  - full-table load time into the BPF FIB next to `ip -batch` into the kernel;
  - incremental route updates per second;
  - the time from an API call returning to the change being visible.
  - kernel sync at scale: a routing daemon's full table installed into the
    kernel while the agent mirrors it; lag, completion and responsiveness."""
from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bpfrouter import netns  # noqa: E402
from bpfrouter.agent.agent import GC_THRESHOLDS  # noqa: E402
from bpfrouter.agent.rtnl import Decoder, dump_routes  # noqa: E402
from bpfrouter.datapath import Datapath  # noqa: E402
from bpfrouter.datapath import layout as lo  # noqa: E402
from bpfrouter.fib import Fib, map_memlock  # noqa: E402
from bpfrouter.interfaces import Interfaces  # noqa: E402
from bpfrouter.labroutes import internet_routes4, internet_routes6  # noqa: E402
from bpfrouter.neighbors import Neighbors  # noqa: E402
from bpfrouter.observe import probe  # noqa: E402
from bpfrouter.packet import mac_bytes, udp_probe  # noqa: E402
from common import (BenchError, Floor, LookupLoop, PacketBench, destinations, fastest_above_harness,  # noqa: E402
                    make_routes, provenance, save, start_lab_router)

OBJECT = str(ROOT / "build" / "router.bpf.o")
NS = "bpfr-fibbench"
GW4 = ["10.254.0.2", "10.254.0.3"]
GW6 = ["fd02::2", "fd02::3"]
SRC = {4: "10.255.0.2", 6: "fd01::2"}  # the sender on fb0
GW_MAC = bytes.fromhex("020000000001")
# name -> (FIB mode, FIB structure): the three data planes every row compares
FIBS = {"dir": (lo.FibMode.BPF, lo.FibImpl.DIR), "lpm": (lo.FibMode.BPF, lo.FibImpl.LPM),
        "kernel": (lo.FibMode.KERNEL, lo.FibImpl.LPM)}


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, text=True)


def setup_netns() -> dict:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    sh("ip", "netns", "add", NS)
    for cmd in ("link add fb0 type veth peer name fb0p", "link add fb1 type veth peer name fb1p",
                "link set lo up", "link set fb0 up", "link set fb0p up", "link set fb1 up", "link set fb1p up",
                "addr add 10.255.0.1/24 dev fb0", "addr add 10.254.0.1/24 dev fb1",
                "addr add fd01::1/64 dev fb0 nodad", "addr add fd02::1/64 dev fb1 nodad"):
        sh("ip", "-n", NS, *cmd.split())
    for i, gw in enumerate(GW4 + GW6):
        sh("ip", "-n", NS, "neigh", "add", gw, "lladdr", f"02:00:00:00:00:{i + 1:02x}", "dev", "fb1",
           "nud", "permanent")
    for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        sh("ip", "netns", "exec", NS, "sysctl", "-qw", f"{key}=1")
    links = {}
    for dev in ("fb0", "fb1"):
        d = json.loads(subprocess.run(["ip", "-n", NS, "-j", "link", "show", dev], check=True,
                                      capture_output=True, text=True).stdout)[0]
        links[dev] = (d["ifindex"], mac_bytes(d["address"]))
    return links


# The route a table's batch installs last: a host route, so that its address
# matches it and nothing longer, whatever the generated table holds.
LAST = {4: ipaddress.ip_network("203.0.113.77/32"), 6: ipaddress.ip_network("2001:db8:ffff::77/128")}


def kernel_load(prefixes, gws) -> float:
    """Install into the namespace's kernel FIB with `ip -batch`; returns seconds."""
    with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
        for i, p in enumerate(prefixes):
            f.write(f"route add {p} via {gws[i % len(gws)]}\n")
        f.write(f"route add {LAST[prefixes[0].version]} via {gws[0]}\n")
    try:
        t = time.perf_counter()
        sh("ip", "-n", NS, "-batch", f.name)
        return time.perf_counter() - t
    finally:
        os.unlink(f.name)


def kernel_flush(version: int) -> None:
    sh("ip", "-n", NS, f"-{version}", "route", "flush", "proto", "boot")


DIR4_STEPS = ("top", "block", "rank")  # bench_dir4_<step>: the lookup stopped after it (dirfib.h)


def pipeline_row(dps: dict[str, Datapath], version: int, dests: bytes, links: dict, rounds: int) -> dict:
    """ns per packet of the router's program (without observers: this row
    compares FIBs; `make bench` gives the observers' share) with each FIB,
    of the minimal forwarder, and of the harness
    alone (reset plus a tail call into xdp_pass), over every destination
    once per round. Each round loads every program afresh (JIT placement
    moves a program by several ns) and takes them in turn, so a slow phase
    of the host lands on every column. Every packet must be counted as
    forwarded by the router (or the floor) and the last one redirected."""
    fb0, fb0_mac = links["fb0"]
    fb1, fb1_mac = links["fb1"]
    frame = udp_probe(SRC[version], "10.0.0.1" if version == 4 else "2001:db8::1", fb0_mac)
    bench = PacketBench(frame, dests, version)
    reason = lo.Reason.FWD_IPV4 if version == 4 else lo.Reason.FWD_IPV6
    times: dict[str, list[float]] = {k: [] for k in ("harness", "floor", *dps)}
    try:
        for _ in range(rounds):
            times["harness"].append(bench.run_harness(fb0, bench.n))
            floor = Floor(fb1, GW_MAC, fb1_mac)
            try:
                times["floor"].append(bench.run_floor(floor, fb0, bench.n))
            finally:
                floor.close()
            for k, dp in dps.items():
                times[k].append(bench.run_router(dp, *FIBS[k], 0, fb0, bench.n, reason))
    finally:
        bench.close()
    row = fastest_above_harness(times)
    return {"harness_ns": row["harness_ns"], **{f"{k}_ns": row[k] for k in ("floor", *dps)},
            "median_ns": row["median"]}


def lookup_row(dps: dict[str, Datapath], version: int, dests: bytes, fb0: int, root4, rounds: int) -> dict:
    """Loops of independent lookups (fibbench.bpf.c), interleaved round by
    round, each lookup checked to have found a forwarding route."""
    loops = {k: LookupLoop(dps[k], *FIBS[k], fb0, {version: dests}, root4=root4 if k == "dir" else None)
             for k in dps}
    v = version
    runs = {"empty_ns": ("dir", f"bench_empty{v}", False), "dir_ns": ("dir", f"bench_dir{v}", True),
            "lpm_ns": ("lpm", f"bench_lpm{v}", True), "fib_lookup_ns": ("kernel", f"bench_kernel{v}", True)}
    if version == 4:
        runs["dir24_ns"] = ("dir", "bench_dir24_4", True)
        runs.update({f"dir_{step}_ns": ("dir", f"bench_dir4_{step}", False) for step in DIR4_STEPS})
    times: dict[str, list[float]] = {k: [] for k in runs}
    try:
        for _ in range(rounds):
            for k, (fib, prog, hits) in runs.items():
                times[k].append(loops[fib].ns(prog, expect_hits=hits))
    finally:
        for loop in loops.values():
            loop.close()
    ns = {k: min(v) for k, v in times.items()}
    row = {k: ns[k] for k in ("empty_ns", "dir_ns", "lpm_ns", "fib_lookup_ns", "dir24_ns") if k in ns}
    if version == 4:
        row["dir_steps_ns"] = {step: ns[f"dir_{step}_ns"] for step in DIR4_STEPS}
    return row


def load_end_to_end(fib: Fib, dp: Datapath, last, fb0: int, fb0_mac: bytes) -> dict:
    """From the kernel's netlink dump of the table to the data plane
    answering for `last`, the route the batch installed last (LAST): dump and
    decode (agent.rtnl, as the agent's resync), write the FIB, probe."""
    t0 = time.perf_counter()
    routes = dump_routes(Decoder())
    t1 = time.perf_counter()
    fib.replace_all(routes)
    d = probe(dp, last.network_address, fb0, fb0_mac)
    t2 = time.perf_counter()
    if d.prefix != str(last):
        raise BenchError(f"after the load, {last.network_address} matched {d.prefix}, not {last}")
    gc.freeze()  # as the agent does after a resync: the mirror out of later collections
    return {"total_s": t2 - t0, "dump_decode_s": t1 - t0, "write_probe_s": t2 - t1, "routes": len(routes)}


def incremental_rate(fib: Fib, dp: Datapath, rng, count: int, links: dict, version: int = 4) -> dict[str, float]:
    """Routes added, then withdrawn, one by one, as the agent applies netlink
    events; the last one, a host route, must be answered by the data plane
    after the adds and gone after the withdrawals."""
    fb0, fb0_mac = links["fb0"]
    nets = internet_routes4(rng, count - 1) if version == 4 else internet_routes6(rng, count - 1)
    last = LAST[version].network_address + 1
    nets.append(ipaddress.ip_network(last))
    routes = make_routes(nets, (GW4 if version == 4 else GW6)[:1], links["fb1"][0], metric=7)
    t = time.perf_counter()
    for r in routes:
        fib.update(r)
    t_add = time.perf_counter() - t
    if probe(dp, last, fb0, fb0_mac).prefix != str(nets[-1]):
        raise BenchError(f"after {count} single adds, {last} is not routed by its host route")
    t = time.perf_counter()
    for r in routes:
        fib.delete(r)
    t_del = time.perf_counter() - t
    if probe(dp, last, fb0, fb0_mac).prefix == str(nets[-1]):
        raise BenchError(f"after {count} single withdrawals, {last} is still routed by its host route")
    return {"adds_per_s": count / t_add, "withdrawals_per_s": count / t_del}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    ap.add_argument("--quick", action="store_true", help="reduced sizes (a few minutes)")
    args = ap.parse_args()
    say = (lambda *a, **k: None) if args.json else (lambda *a, **k: print(*a, **k, flush=True))
    sizes4 = [1000, 100_000] if args.quick else [1000, 100_000, 1_000_000]
    size6 = 23_000 if args.quick else 230_000
    n = 200_000 if args.quick else 1_000_000
    rounds = 3 if args.quick else 5
    rng = np.random.default_rng(42)
    gc.set_threshold(*GC_THRESHOLDS)  # the agent's collector settings, for its per-route paths
    links = setup_netns()
    fb0, fb0_mac = links["fb0"]
    fb1, _ = links["fb1"]
    result: dict = {"provenance": provenance("make bench-fib" + (" ARGS=--quick" if args.quick else "")),
                    "destinations": n, "rounds": rounds, "statistic": "fastest run over the rounds",
                    "pipeline": [], "lookups": [],
                    "load": {}, "memory": {}}
    dps: dict[str, Datapath] = {}
    try:
        with netns.entered(NS):
            for name, (mode, impl) in FIBS.items():
                dp = Datapath.load(f"fibbench-{name}", OBJECT, mode, impl, groups=(65536, 32768))
                ifs = Interfaces(dp)
                for dev in ("fb0", "fb1"):
                    ifs.configure(links[dev][0], links[dev][1], 1500)
                nb = Neighbors(dp)
                for i, gw in enumerate(GW4 + GW6):
                    nb.set(fb1, ipaddress.ip_address(gw), bytes([2, 0, 0, 0, 0, i + 1]), 0x80)
                dps[name] = dp
            fibs = {k: Fib(dps[k]) for k in ("dir", "lpm")}
            for version, size in [(4, s) for s in sizes4] + [(6, size6)]:
                table = f"IPv{version} {size}"
                say(f"{table} prefixes: generating, ip -batch", end="")
                prefixes = internet_routes4(rng, size) if version == 4 else internet_routes6(rng, size)
                gws = GW4 if version == 4 else GW6
                load = {"routes": size, "kernel_ip_batch_s": kernel_load(prefixes, gws)}
                say(", loading", end="")
                for k, fib in fibs.items():
                    load[k] = load_end_to_end(fib, dps[k], LAST[version], fb0, fb0_mac)
                say(", per packet", end="")
                dests = destinations(rng, prefixes, n, version)
                result["pipeline"].append({"table": table, "routes": size,
                                           **pipeline_row(dps, version, dests, links, rounds)})
                say(", lookups")
                root4 = fibs["dir"].tables[4].root if version == 4 else None
                result["lookups"].append({"table": table, **lookup_row(dps, version, dests, fb0, root4, rounds)})
                result["load"][table] = load
                mem = fibs["dir"].tables[version].memory()
                result["memory"][table] = {
                    "dir_bytes": mem["bytes"], "dir_forwarding_bytes": mem["forwarding_bytes"],
                    # the structure's fill: IPv4's groups, IPv6's hash slots (and its levels)
                    "dir_used": mem["groups_used"] if version == 4 else mem["slots_used"],
                    **({"dir_levels": mem["levels"]} if version == 6 else {}),
                    "lpm_bytes": map_memlock((dps["lpm"].fib4 if version == 4 else dps["lpm"].fib6).fd)}
                if version == 4 and size == sizes4[-1]:
                    result["incremental_routes_per_s"] = {
                        k: incremental_rate(fib, dps[k], rng, 20_000 if args.quick else 50_000, links)
                        for k, fib in fibs.items()}
                if version == 6:  # into the full table: single changes, with moves and rebuilds
                    result["incremental_routes_per_s_v6"] = {
                        k: incremental_rate(fib, dps[k], rng, 2_000 if args.quick else 20_000, links, 6)
                        for k, fib in fibs.items()}
                for fib in fibs.values():
                    fib.replace_all([])
                kernel_flush(version)
            for fib in fibs.values():
                fib.close()
    finally:
        for dp in dps.values():
            dp.destroy()
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    result["api_visible"] = api_visibility()
    say("kernel sync at scale: installing into a lab router's kernel FIB")
    result["sync"] = sync_at_scale(100_000 if args.quick else 1_000_000)
    save("fib.json", result)
    if args.json:
        print(json.dumps(result))
        return
    report(result)


def api_visibility(samples: int = 20) -> dict:
    """`bpfrouter route add` through the agent's API on a lab router, then
    probes of the data plane straight after the call returns."""
    from bpfrouter.agent.client import request
    from bpfrouter.lab import Lab
    from bpfrouter.observe import probe
    lab = Lab("fibapi")
    lab.up()
    try:
        start_lab_router(lab, "fibapi")
        lab.run("h1", ["ping", "-c", "1", lab.addr("h2")], check=True)
        call_ms, first_probe_ok, probe_us = [], 0, []
        with netns.entered(lab.router_ns):
            dp = Datapath.open("fibapi")
            iif, mac = lab.link("r", "r-eth0")
            for i in range(samples):
                prefix = f"10.{100 + i}.0.0/16"
                t0 = time.perf_counter()
                resp = request("fibapi", "route_add", args=[prefix, "via", lab.addr("h2")])
                t1 = time.perf_counter()
                d = probe(dp, f"10.{100 + i}.1.1", iif, mac)
                t2 = time.perf_counter()
                assert resp.get("ok"), resp
                call_ms.append((t1 - t0) * 1e3)
                probe_us.append((t2 - t1) * 1e6)
                first_probe_ok += d.prefix == prefix
            dp.close()
        return {"samples": samples, "api_call_ms_median": statistics.median(call_ms),
                "visible_on_first_probe": first_probe_ok, "first_probe_done_us_median": statistics.median(probe_us)}
    finally:
        lab.down()


def sync_at_scale(n: int, chunks: int = 20) -> dict:
    """Install n routes into a lab router's kernel FIB in chunks (as a routing
    daemon would), while sampling the agent: how far behind the data plane is,
    when the mirror completes, and how fast status and route get answer."""
    import threading
    from bpfrouter.agent.client import request
    from bpfrouter.lab import Lab
    from bpfrouter.observe import probe
    lab = Lab("fibsync")
    lab.up()
    try:
        start_lab_router(lab, "fibsync")
        lab.run("h1", ["ping", "-c", "1", lab.addr("h2")], check=True)
        prefixes = internet_routes4(np.random.default_rng(7), n)
        files = []
        for k in range(chunks):
            f = tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False)
            f.write("".join(f"route add {p} via {lab.addr('h2')}\n" for p in prefixes[k::chunks]))
            f.close()
            files.append(f.name)
        base = request("fibsync", "ping")["fib"]["ipv4"]
        done: list[tuple[float, int]] = []
        t0 = time.perf_counter()

        def install():
            for k, name in enumerate(files):
                subprocess.run(lab.cmd("r", ["ip", "-batch", name]), check=True)
                done.append((time.perf_counter() - t0, sum(len(prefixes[j::chunks]) for j in range(k + 1))))

        th = threading.Thread(target=install)
        th.start()
        samples, ping_s, probe_s = [], [], []
        with netns.entered(lab.router_ns):
            dp = Datapath.open("fibsync")
            iif, mac = lab.link("r", "r-eth0")
            while True:
                t = time.perf_counter()
                st = request("fibsync", "ping", timeout=60)
                ping_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                probe(dp, lab.addr("h2"), iif, mac)
                probe_s.append(time.perf_counter() - t)
                samples.append((time.perf_counter() - t0, st["fib"]["ipv4"] - base))
                if samples[-1][1] >= n:
                    break
                time.sleep(0.05)
            dp.close()
        th.join()
        for name in files:
            os.unlink(name)
        lags = []
        for t_done, count in done:
            caught = next((t for t, c in samples if c >= count), samples[-1][0])
            lags.append(max(0.0, caught - t_done))
        return {"routes": n, "kernel_install_s": done[-1][0], "mirror_complete_s": samples[-1][0],
                "mirror_after_kernel_s": samples[-1][0] - done[-1][0], "max_lag_s": max(lags),
                "status_max_s": max(ping_s), "route_get_max_s": max(probe_s),
                "sample_interval_s": 0.05}
    finally:
        lab.down()


def report(r: dict) -> None:
    p = r["provenance"]
    print(f"\n{p['command']} at {p['commit']} on {p['cpu']} ({p['cpus']} CPUs, kernel {p['kernel']})")
    print(f"\nwhat a packet pays: the router's XDP program (observers off: this table compares FIBs), parse to "
          f"redirect,\nns per packet over {r['destinations']} random destinations hitting the table (fastest run of "
          f"{r['rounds']} rounds\nof fresh loads; every packet checked forwarded):")
    print(f"  {'table':13} {'floor':>6} {'DIR':>6} {'LPM':>7} {'kernel':>7} {'DIR/floor':>9} {'LPM/DIR':>8} "
          f"{'kern/DIR':>8}")
    for x in r["pipeline"]:
        d = x["dir_ns"]
        print(f"  {x['table']:13} {x['floor_ns']:6.1f} {d:6.1f} {x['lpm_ns']:7.1f} {x['kernel_ns']:7.1f} "
              f"{d / x['floor_ns']:8.2f}x {x['lpm_ns'] / d:7.2f}x {x['kernel_ns'] / d:7.2f}x")
    v4 = [x for x in r["pipeline"] if x["table"].startswith("IPv4")]
    small, big = v4[0], v4[-1]
    print(f"  what the table's size costs a packet ({small['table']} -> {big['table']}): " +
          ", ".join(f"{name} {big[k] - small[k]:+.1f} ns" for k, name in
                    (("dir_ns", "DIR"), ("lpm_ns", "LPM"), ("kernel_ns", "kernel"))))
    print("  (floor: the minimal forwarder, one fixed next hop; kernel: bpfrouter --fib kernel, "
          "bpf_fib_lookup with its neighbor lookup, as the DIR and LPM pipelines do theirs;\n"
          f"   the harness's own cost, {r['pipeline'][0]['harness_ns']:.1f} ns, is taken off every column)")
    print("\nfull-table load, end to end: the kernel's netlink dump -> decoded -> FIB written -> the data plane "
          "answers\nfor the last route (seconds; ip -batch: the kernel's own install of the same routes):")
    print(f"  {'table':13} {'DIR':>6} {'(dump':>6} {'write)':>7} {'LPM':>6} {'ip -batch':>9}")
    for table, ld in r["load"].items():
        print(f"  {table:13} {ld['dir']['total_s']:6.2f} {ld['dir']['dump_decode_s']:6.2f} "
              f"{ld['dir']['write_probe_s']:7.2f} {ld['lpm']['total_s']:6.2f} {ld['kernel_ip_batch_s']:9.2f}")
    print("\nsecondary: loops of independent lookups, ns per lookup (a lookup's throughput: the CPU overlaps "
          "their\ncache misses, so these are not what a packet pays; every lookup checked to hit):")
    print(f"  {'table':13} {'empty':>6} {'DIR':>6} {'DIR-24':>7} {'LPM':>7} {'fib_lkp':>8}")
    for x in r["lookups"]:
        d24 = f"{x['dir24_ns']:7.1f}" if "dir24_ns" in x else f"{'-':>7}"
        print(f"  {x['table']:13} {x['empty_ns']:6.1f} {x['dir_ns']:6.1f} {d24} {x['lpm_ns']:7.1f} "
              f"{x['fib_lookup_ns']:8.1f}")
    print("  (DIR-24: IPv4's root uncompressed, 64 MiB; fib_lkp: bpf_fib_lookup alone)")
    print("  IPv4 DIR lookup stopped after each step: top / + the block's word / + counting runs / all")
    for x in r["lookups"]:
        if "dir_steps_ns" in x:
            print(f"  {x['table']:13} " + " / ".join(f"{x['dir_steps_ns'][k]:.1f}" for k in DIR4_STEPS) +
                  f" / {x['dir_ns']:.1f}")
    print("\nmemory (MiB):")
    print(f"  {'table':13} {'DIR':>8} {'fwd':>8} {'used':>7} {'LPM':>8}")
    for table, m in r["memory"].items():
        print(f"  {table:13} {m['dir_bytes'] / 2**20:8.1f} {m['dir_forwarding_bytes'] / 2**20:8.1f} "
              f"{m['dir_used']:7} {m['lpm_bytes'] / 2**20:8.1f}")
    print("  (DIR: allocated; fwd: what forwarding reads; used: IPv4 groups, IPv6 hash slots)")
    print("\nincremental updates, one route at a time (adds / withdrawals per second):")
    for label, key, dir_name in (("IPv4", "incremental_routes_per_s", "DIR"),
                                 ("IPv6", "incremental_routes_per_s_v6", "hash levels")):
        inc = r.get(key, {})
        print(f"  {label} " + ", ".join(f"{name} {inc[k]['adds_per_s']:,.0f} / {inc[k]['withdrawals_per_s']:,.0f}"
                                        for k, name in (("dir", dir_name), ("lpm", "LPM")) if k in inc))
    a = r["api_visible"]
    print(f"API route add: {a['api_call_ms_median']:.2f} ms per call (median); change visible on the first "
          f"probe after return in {a['visible_on_first_probe']}/{a['samples']} calls "
          f"(probe done {a['first_probe_done_us_median']:.0f} us after return)")
    y = r["sync"]
    print(f"\nkernel sync at scale, {y['routes']} routes installed with ip -batch in 20 chunks:")
    print(f"  kernel install {y['kernel_install_s']:.1f} s; mirror complete {y['mirror_complete_s']:.1f} s "
          f"({y['mirror_after_kernel_s']:+.2f} s); worst lag behind the kernel {y['max_lag_s']:.2f} s; "
          f"slowest status {y['status_max_s'] * 1e3:.0f} ms, slowest route get {y['route_get_max_s'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
