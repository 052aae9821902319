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
from bpfrouter.datapath import Datapath  # noqa: E402
from bpfrouter.datapath import layout as lo  # noqa: E402
from bpfrouter.fib import TABLE_MAIN, Fib, Nexthop, Route, RouteType, map_memlock  # noqa: E402
from bpfrouter.interfaces import Interfaces  # noqa: E402
from bpfrouter.labroutes import internet_routes4, internet_routes6  # noqa: E402
from bpfrouter.neighbors import Neighbors  # noqa: E402
from bpfrouter.packet import mac_bytes  # noqa: E402
from common import Bench, save, start_lab_router  # noqa: E402

OBJECT = str(ROOT / "build" / "router.bpf.o")
NS = "bpfr-fibbench"
GW4 = ["10.254.0.2", "10.254.0.3"]
GW6 = ["fd02::2", "fd02::3"]


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


def kernel_load(prefixes, gws) -> float:
    """Install into the namespace's kernel FIB with `ip -batch`; returns seconds."""
    with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
        for i, p in enumerate(prefixes):
            f.write(f"route add {p} via {gws[i % len(gws)]}\n")
    try:
        t = time.perf_counter()
        sh("ip", "-n", NS, "-batch", f.name)
        return time.perf_counter() - t
    finally:
        os.unlink(f.name)


def kernel_flush(version: int) -> None:
    sh("ip", "-n", NS, f"-{version}", "route", "flush", "proto", "boot")


_HOPS: dict[tuple[int, str], tuple[Nexthop]] = {}


def make_routes(prefixes, gws, ifindex: int, metric: int = 1024) -> list[Route]:
    """As the netlink decoder (agent.rtnl) builds them: each route's key made
    with it, from the address bytes, and one next-hop tuple per gateway, the
    same object in every batch."""
    hops = [_HOPS.setdefault((ifindex, g), (Nexthop(ifindex, ipaddress.ip_address(g)),)) for g in gws]
    return [Route.from_key((p.version, int.from_bytes(p.network_address.packed, "big"), p.prefixlen),
                           RouteType.UNICAST, hops[i % len(hops)], 3, metric, TABLE_MAIN)
            for i, p in enumerate(prefixes)]


def destinations(rng, prefixes, n: int, version: int) -> bytes:
    """n addresses, each inside a random prefix of the table, as network-order bytes."""
    idx = rng.integers(0, len(prefixes), n)
    if version == 4:
        nets = np.array([int(p.network_address) for p in prefixes], np.uint64)[idx]
        lens = np.array([p.prefixlen for p in prefixes], np.uint64)[idx]
        host = rng.integers(0, 1 << 32, n, dtype=np.uint64) & ((np.uint64(1) << (np.uint64(32) - lens)) - 1)
        return (nets | host).astype(">u4").tobytes()
    hi = np.array([int(p.network_address) >> 64 for p in prefixes], np.uint64)[idx]
    lo_ = np.array([int(p.network_address) & ((1 << 64) - 1) for p in prefixes], np.uint64)[idx]
    lens = np.array([p.prefixlen for p in prefixes], np.int64)[idx]
    r_hi = rng.integers(0, 1 << 63, n, dtype=np.uint64) << np.uint64(1)
    r_lo = rng.integers(0, 1 << 63, n, dtype=np.uint64) << np.uint64(1)
    hi_host = np.where(lens >= 64, 0, (np.uint64(1) << np.clip(64 - lens, 0, 63).astype(np.uint64)) - 1)
    hi_host = np.where(lens == 0, np.uint64(~np.uint64(0)), hi_host).astype(np.uint64)
    lo_host = np.where(lens <= 64, np.uint64(~np.uint64(0)),
                       (np.uint64(1) << np.clip(128 - lens, 0, 63).astype(np.uint64)) - 1).astype(np.uint64)
    out = np.empty((n, 2), ">u8")
    out[:, 0] = hi | (r_hi & hi_host)
    out[:, 1] = lo_ | (r_lo & lo_host)
    return out.tobytes()


FOOTPRINTS_MIB = (1, 4, 16, 32, 64)
DIR4_STEPS = ("top", "block", "rank")  # bench_dir4_<step>: the lookup stopped after it (dirfib.h)


def footprint(dp: Datapath, n: int, ifindex: int, eth: bytes, dests: dict[int, bytes], rounds: int) -> dict:
    """One random read per destination over 1-64 MiB, same loop and destinations
    as the lookups: what the DIR root's miss costs (64 MiB), and what a
    structure small enough for the caches would pay per dependent read."""
    out = {}
    for mib in FOOTPRINTS_MIB:
        b = Bench(dp, lo.FibMode.BPF, lo.FibImpl.DIR, n, ifindex, eth, dests, mem_bytes=mib << 20)
        try:
            out[f"{mib}_MiB_ns"] = b.ns("bench_mem4", rounds)
        finally:
            b.close()
    return out


def interleaved(runs: dict[str, tuple[Bench, str]], rounds: int) -> dict[str, float]:
    """The median ns of each (bench, program), its rounds taken in turn with
    the others' (the first round of each, then the second...): a slow phase
    of the host, minutes long, then lands on every program of a row, not on
    one of them."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, (bench, prog) in runs.items():
            times[k].append(bench.ns(prog, 1))
    return {k: statistics.median(v) for k, v in times.items()}


def incremental_rate(fib: Fib, rng, count: int, ifindex: int, version: int = 4) -> dict[str, float]:
    """Routes added, then withdrawn, one by one, as the agent applies netlink events."""
    nets = internet_routes4(rng, count) if version == 4 else internet_routes6(rng, count)
    routes = make_routes(nets, (GW4 if version == 4 else GW6)[:1], ifindex, metric=7)
    t = time.perf_counter()
    for r in routes:
        fib.update(r)
    t_add = time.perf_counter() - t
    t = time.perf_counter()
    for r in routes:
        fib.delete(r)
    return {"adds_per_s": count / t_add, "withdrawals_per_s": count / (time.perf_counter() - t)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    ap.add_argument("--quick", action="store_true", help="reduced sizes (about a minute)")
    args = ap.parse_args()
    say = (lambda *a, **k: None) if args.json else (lambda *a, **k: print(*a, **k, flush=True))
    sizes4 = [1000, 100_000] if args.quick else [1000, 100_000, 1_000_000]
    size6 = 23_000 if args.quick else 230_000
    n = 200_000 if args.quick else 1_000_000
    rounds = 3
    rng = np.random.default_rng(42)
    gc.set_threshold(*GC_THRESHOLDS)  # the agent's collector settings, for its per-route paths
    links = setup_netns()
    fb0, fb0_mac = links["fb0"]
    fb1, _ = links["fb1"]
    eth = fb0_mac + bytes.fromhex("020000000101") + b"\x08\x00"
    result: dict = {"destinations": n, "rounds": rounds, "statistic": "median", "lookups": [], "pipeline": [],
                    "load": {}, "memory": {}}
    dps: dict[str, Datapath] = {}
    try:
        with netns.entered(NS):
            for name, mode, impl in (("dir", lo.FibMode.BPF, lo.FibImpl.DIR), ("lpm", lo.FibMode.BPF, lo.FibImpl.LPM),
                                     ("kernel", lo.FibMode.KERNEL, lo.FibImpl.LPM)):
                dp = Datapath.load(f"fibbench-{name}", OBJECT, mode, impl, groups=(65536, 32768))
                ifs = Interfaces(dp)
                for dev in ("fb0", "fb1"):
                    ifs.configure(links[dev][0], links[dev][1], 1500)
                nb = Neighbors(dp)
                for i, gw in enumerate(GW4 + GW6):
                    nb.set(fb1, ipaddress.ip_address(gw), bytes([2, 0, 0, 0, 0, i + 1]), 0x80)
                dps[name] = dp
            fibs = {k: Fib(dps[k]) for k in ("dir", "lpm")}
            tables = [(4, s) for s in sizes4] + [(6, size6)]
            for version, size in tables:
                say(f"IPv{version} {size} prefixes: generating, loading", end="")
                prefixes = internet_routes4(rng, size) if version == 4 else internet_routes6(rng, size)
                gws = GW4 if version == 4 else GW6
                routes = make_routes(prefixes, gws, fb1)
                load = {"routes": size}
                for k, fib in fibs.items():
                    t = time.perf_counter()
                    fib.replace_all(routes)
                    load[f"{k}_s"] = time.perf_counter() - t
                    gc.freeze()  # as the agent does after a resync: the mirror out of later collections
                    say(".", end="")
                load["kernel_ip_batch_s"] = kernel_load(prefixes, gws)
                say(". measuring")
                dests = {version: destinations(rng, prefixes, n, version)}
                # the DIR bench also reads IPv4's root uncompressed, as forwarding did until 2026-11-23
                root4 = fibs["dir"].tables[4].root if version == 4 else None
                benches = {k: Bench(dps[k], m, impl, n, fb0, eth, dests, root4=root4 if k == "dir" else None)
                           for k, m, impl in
                           (("dir", lo.FibMode.BPF, lo.FibImpl.DIR), ("lpm", lo.FibMode.BPF, lo.FibImpl.LPM),
                            ("kernel", lo.FibMode.KERNEL, lo.FibImpl.LPM))}
                v = version
                runs = {"empty_ns": ("dir", f"bench_empty{v}"), "dir_ns": ("dir", f"bench_dir{v}"),
                        "lpm_ns": ("lpm", f"bench_lpm{v}"), "fib_lookup_ns": ("kernel", f"bench_kernel{v}")}
                if version == 4:
                    runs["dir24_ns"] = ("dir", "bench_dir24_4")
                    runs.update({f"dir_{step}_ns": ("dir", f"bench_dir4_{step}") for step in DIR4_STEPS})
                    runs.update({f"pipeline_{k}_ns": (k, "bench_pipeline4") for k in benches})
                    runs["pipeline_reset_ns"] = ("dir", "bench_pipeline_reset4")
                ns = interleaved({k: (benches[b], prog) for k, (b, prog) in runs.items()}, rounds)
                row = {"table": f"IPv{v} {size}", "routes": size,
                       **{k: ns[k] for k in ("empty_ns", "dir_ns", "lpm_ns", "fib_lookup_ns", "dir24_ns") if k in ns}}
                if version == 4:
                    row["dir_steps_ns"] = {step: ns[f"dir_{step}_ns"] for step in DIR4_STEPS}
                if version == 4 and size == sizes4[-1]:
                    result["footprint"] = footprint(dps["dir"], n, fb0, eth, dests, rounds)
                result["lookups"].append(row)
                if version == 4:
                    result["pipeline"].append({
                        "table": row["table"], "reset_only_ns": ns["pipeline_reset_ns"],
                        **{f"{k}_ns": ns[f"pipeline_{k}_ns"] for k in ("dir", "lpm", "kernel")}})
                for b in benches.values():
                    b.close()
                result["load"][row["table"]] = load
                mem = fibs["dir"].tables[version].memory()
                result["memory"][row["table"]] = {
                    "dir_bytes": mem["bytes"], "dir_forwarding_bytes": mem["forwarding_bytes"],
                    # the structure's fill: IPv4's groups, IPv6's hash slots (and its levels)
                    "dir_used": mem["groups_used"] if version == 4 else mem["slots_used"],
                    **({"dir_levels": mem["levels"]} if version == 6 else {}),
                    "lpm_bytes": map_memlock((dps["lpm"].fib4 if version == 4 else dps["lpm"].fib6).fd)}
                if version == 4 and size == sizes4[-1]:
                    result["incremental_routes_per_s"] = {
                        k: incremental_rate(fib, rng, 20_000 if args.quick else 50_000, fb1)
                        for k, fib in fibs.items()}
                if version == 6:  # into the full table: single changes, with moves and rebuilds
                    result["incremental_routes_per_s_v6"] = {
                        k: incremental_rate(fib, rng, 2_000 if args.quick else 20_000, fb1, 6)
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
    print(f"\nFIB lookups in the kernel, {r['destinations']} random destinations hitting the table, "
          f"ns per lookup ({r['statistic']} of {r['rounds']}):")
    print(f"  {'table':13} {'empty':>6} {'DIR':>6} {'DIR-24':>7} {'LPM':>7} {'fib_lkp':>8} {'DIR-empty':>9} "
          f"{'LPM/DIR':>8} {'fibl/DIR':>8}")
    for x in r["lookups"]:
        d = x["dir_ns"]
        d24 = f"{x['dir24_ns']:7.1f}" if "dir24_ns" in x else f"{'-':>7}"
        print(f"  {x['table']:13} {x['empty_ns']:6.1f} {d:6.1f} {d24} {x['lpm_ns']:7.1f} {x['fib_lookup_ns']:8.1f} "
              f"{d - x['empty_ns']:9.1f} {x['lpm_ns'] / d:7.1f}x {x['fib_lookup_ns'] / d:7.1f}x")
    print("  (IPv4 DIR reads the compressed root; DIR-24 the same root uncompressed, 64 MiB, in the same run)")
    print("IPv4 DIR lookup stopped after each step (ns): top / + the block's bitmap word / + counting runs / "
          "all (+ the run's id and entry)")
    for x in r["lookups"]:
        if "dir_steps_ns" in x:
            print(f"  {x['table']:13} " + " / ".join(f"{x['dir_steps_ns'][k]:.1f}" for k in DIR4_STEPS) +
                  f" / {x['dir_ns']:.1f}")
    if "footprint" in r:
        print("one random read per destination over a footprint of (ns, same loop; DIR-24's root is 64 MiB):")
        print("  " + "  ".join(f"{k.replace('_MiB_ns', ' MiB')}: {v:.1f}" for k, v in r["footprint"].items()))
    print("\nwhole XDP pipeline, varying destinations, ns per packet:")
    print(f"  {'table':13} {'reset':>6} {'DIR':>6} {'LPM':>7} {'kernel':>7}")
    for x in r["pipeline"]:
        print(f"  {x['table']:13} {x['reset_only_ns']:6.1f} {x['dir_ns']:6.1f} {x['lpm_ns']:7.1f} {x['kernel_ns']:7.1f}")
    print("\nfull-table load (seconds) and memory:")
    print(f"  {'table':13} {'DIR':>6} {'LPM':>6} {'ip -batch':>9} {'DIR MiB':>8} {'fwd MiB':>8} {'used':>7} "
          f"{'LPM MiB':>8}")
    for table, ld in r["load"].items():
        m = r["memory"][table]
        print(f"  {table:13} {ld['dir_s']:6.2f} {ld['lpm_s']:6.2f} {ld['kernel_ip_batch_s']:9.2f} "
              f"{m['dir_bytes'] / 2**20:8.1f} {m['dir_forwarding_bytes'] / 2**20:8.1f} {m['dir_used']:7} "
              f"{m['lpm_bytes'] / 2**20:8.1f}")
    print("  (DIR MiB: allocated; fwd MiB: what forwarding reads: IPv4's compressed root and groups in use, "
          "IPv6's buckets in use; used: IPv4 groups, IPv6 hash slots)")
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
