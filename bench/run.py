#!/usr/bin/env python3
"""bpfrouter benchmarks (`make bench`, `ARGS=--json`, `ARGS=--quick`).

1. What a packet pays: the router's attached XDP program, from parse to
   verdict, run by the per-packet harness (pktbench.bpf.c: one
   BPF_PROG_TEST_RUN, each run restores the frame with its next destination
   and tail-calls the program), beside the minimal XDP forwarder (the floor
   of any router's cost, baseline.bpf.c) and the same pipeline with the
   kernel's FIB (bpf_fib_lookup). Hot: the lab's routes, one destination.
   Cold: a full table (1M IPv4, 230k IPv6 routes), a different random
   destination for every packet. With and without the observers (flows,
   events), each on a packet of a known flow (hot) and of a new one (cold).
   Every row checks, through the router's counters, that every packet got
   the verdict the row claims.
2. The idle capture hook: the attached program has none (compared
   instruction by instruction).
3. Lab forwarding: the same traffic through the same topology, forwarded by
   the kernel, by the minimal XDP forwarder and by bpfrouter, after a floor
   run where a bare sink replaces the router. The generator is a
   live-frames BPF_PROG_TEST_RUN (XDP_TX) in h1 pinned to cpu0; batches of
   64 frames never overrun the veth's 256-slot ring, and the receive work
   runs in softirq on the same core, so delivered packets/s is the whole
   path's rate. Packets are counted where they arrive (an XDP sink on h2),
   and CPU time per packet is taken over both cores from /proc/stat; the
   difference to the floor is the router's share (plus one veth hop).
   trafgen was tried first: its send path costs about 3 us per packet here,
   so it measured itself. Threaded NAPI on veth stalls on this kernel."""
from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bpfrouter import netns  # noqa: E402
from bpfrouter.bpf import (BPF_F_TEST_XDP_LIVE_FRAMES, BpfError, BpfObject, Link, XDP_FLAGS_DRV_MODE,  # noqa: E402
                           map_info, prog_map_ids, prog_xlated)
from bpfrouter.datapath import Datapath  # noqa: E402
from bpfrouter.datapath import layout as lo  # noqa: E402
from bpfrouter.fib import Fib  # noqa: E402
from bpfrouter.interfaces import Interfaces  # noqa: E402
from bpfrouter.lab import Lab  # noqa: E402
from bpfrouter.labroutes import internet_routes4, internet_routes6  # noqa: E402
from bpfrouter.neighbors import Neighbors  # noqa: E402
from bpfrouter.packet import udp_probe  # noqa: E402
from bpfrouter.datapath.stages import ChainConfig, load_chain  # noqa: E402
from common import (BASELINE, ROUTER_SINGLE, RUNS_PER_LOAD, BenchError, Floor, PacketBench, bpfrouter,  # noqa: E402
                    destinations, fastest_above_harness, make_routes, provenance, save, start_lab_router)

OBJECT = str(ROOT / "build" / "router.bpf.o")
ALL_OBSERVERS = lo.OBS_F_EVENTS | lo.OBS_F_FLOWS  # what `bpfrouter up` attaches (the capture hook is swapped in)
# column -> (FIB mode, OBS_F_* compiled in); "floor" is the minimal forwarder
VARIANTS = {"bpfrouter": (lo.FibMode.BPF, ALL_OBSERVERS), "no observers": (lo.FibMode.BPF, 0),
            "flows": (lo.FibMode.BPF, lo.OBS_F_FLOWS), "events": (lo.FibMode.BPF, lo.OBS_F_EVENTS),
            "kernel FIB": (lo.FibMode.KERNEL, ALL_OBSERVERS)}
# column -> the same as "bpfrouter", built as one program (router_single.bpf.o): the chain's cost beside it
SINGLE = "single program"
STAGED_COST_LIMIT = 1.10  # the chain may cost at most 10% more than the single program on a forward


class Case:
    """One row: packets of one family to `dests`, run through each target,
    each expected to end with `reason` (for the kernel FIB: kernel_reason).
    With `to`, every packet goes to that address and `dests` are their
    sources (the load balancer's rows: a VIP, and one flow or new ones)."""

    def __init__(self, label: str, version: int, dests: bytes, dps: dict[str, Datapath], reason: lo.Reason,
                 kernel_reason: lo.Reason | None = None, floor: bool = True, single: bool = True,
                 to: str | None = None):
        self.label, self.version, self.dests, self.dps = label, version, dests, dps
        self.reason, self.kernel_reason, self.floor, self.single = reason, kernel_reason, floor, single
        self.to = to

    def routers(self) -> int:
        """The router targets a round runs (every one but the floor)."""
        return sum(1 for k in VARIANTS if k != "kernel FIB" or self.kernel_reason is not None) + self.single


def run_case(case: Case, lab: Lab, packets: int, rounds: int) -> dict:
    """ns per packet of each target: the fastest run over `rounds` rounds
    (the median is kept in the JSON). Every round loads every program afresh
    (JIT placement moves a program's cost) and takes the targets in turn.
    This VM's interference comes in phases of seconds that can double a
    figure and only ever adds time, so the fastest run is the figure. The
    harness's own cost (reset and a tail call into xdp_pass) is taken off
    every figure."""
    r_eth0, r_mac = lab.link("r", "r-eth0")
    r_eth1, r1_mac = lab.link("r", "r-eth1")
    _, h2_mac = lab.link("h2", "h2-eth0")
    frame = udp_probe(lab.addr("h1", case.version), case.to or lab.addr("h2", case.version), r_mac)
    bench = PacketBench(frame, case.dests, case.version, sources=case.to is not None)
    targets = (["floor"] if case.floor else []) + [k for k in VARIANTS
                                                   if k != "kernel FIB" or case.kernel_reason is not None]
    targets += [SINGLE] if case.single else []
    times: dict[str, list[float]] = {k: [] for k in ("harness", *targets)}
    try:
        for _ in range(rounds):
            times["harness"].append(bench.run_harness(r_eth0, packets))
            for k in targets:
                if k == "floor":
                    floor = Floor(r_eth1, h2_mac, r1_mac)
                    try:
                        times[k].append(bench.run_floor(floor, r_eth0, packets))
                    finally:
                        floor.close()
                    continue
                if k == SINGLE:
                    times[k].append(bench.run_router(case.dps["bpf"], lo.FibMode.BPF, lo.FibImpl.DIR, ALL_OBSERVERS,
                                                     r_eth0, packets, case.reason, single=True))
                    continue
                mode, observe = VARIANTS[k]
                kernel = mode == lo.FibMode.KERNEL
                times[k].append(bench.run_router(case.dps["kernel" if kernel else "bpf"], mode,
                                                 lo.FibImpl.LPM if kernel else lo.FibImpl.DIR, observe, r_eth0,
                                                 packets, case.kernel_reason if kernel else case.reason))
    finally:
        bench.close()
    return {"case": case.label, **fastest_above_harness(times)}


def cold_datapath(lab: Lab, version: int, size: int, rng) -> tuple[Datapath, Fib, bytes]:
    """A data plane of the router's program (not attached) in the lab router's
    namespace, its FIB loaded with `size` Internet-shaped routes via h2, and
    1M random destinations (quick: 200k) that hit them."""
    dp = Datapath.load(f"bench-cold{version}", OBJECT, lo.FibMode.BPF, lo.FibImpl.DIR, groups=(65536, 32768))
    try:
        ifs = Interfaces(dp)
        for name in ("r-eth0", "r-eth1"):
            idx, mac = lab.link("r", name)
            ifs.configure(idx, mac, 1500)
        r_eth1, _ = lab.link("r", "r-eth1")
        _, h2_mac = lab.link("h2", "h2-eth0")
        Neighbors(dp).set(r_eth1, ipaddress.ip_address(lab.addr("h2", version)), h2_mac, 0x80)
        prefixes = internet_routes4(rng, size) if version == 4 else internet_routes6(rng, size)
        fib = Fib(dp)
        fib.replace_all(make_routes(prefixes, [lab.addr("h2", version)], r_eth1))
    except BaseException:
        dp.destroy()
        raise
    return dp, fib, prefixes


ECMP_PATHS = 8


def add_ecmp_routes(lab: Lab) -> None:
    """Two /16s toward h2 for the ECMP rows: 10.62/16 over ECMP_PATHS
    gateways (addresses of h2, resolved first), 10.63/16 through the first
    alone; the same random destinations in each set the group's cost apart."""
    gws = [f"10.0.2.{31 + i}" for i in range(ECMP_PATHS)]
    for gw in gws:
        lab.run("h2", ["ip", "addr", "add", f"{gw}/24", "dev", "h2-eth0"], check=True)
        lab.run("r", ["ping", "-c1", "-W2", gw], check=True)
    lab.run("r", ["ip", "route", "add", "10.62.0.0/16", *[w for gw in gws for w in ("nexthop", "via", gw)]],
            check=True)
    lab.run("r", ["ip", "route", "add", "10.63.0.0/16", "via", gws[0]], check=True)
    for prefix, kind in (("10.62.1.1", "multipath"), ("10.63.1.1", "unicast")):
        deadline = time.monotonic() + 10
        while f"({kind}" not in bpfrouter("route", "get", prefix, "--name", "bench"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not mirror the {kind} route to {prefix}")
            time.sleep(0.1)


RULE_COUNTS = (0, 10, 100, 1000)
VIP4, VIP6, VIP_PORT = "10.0.200.1", "fd00:200::1", 33434   # the bench frame's UDP port


def add_bench_services(lab: Lab) -> dict[int, str]:
    """A UDP service per family, to h2's addresses (resolved neighbors):
    the ECMP gateways' 8 for IPv4, h2's own for IPv6. Returns each
    family's service as `service show` names it."""
    out = {}
    for v, vip, backends in ((4, VIP4, [f"10.0.2.{31 + i}" for i in range(ECMP_PATHS)]),
                             (6, VIP6, [lab.addr("h2", 6)])):
        key = f"{vip}:{VIP_PORT}" if v == 4 else f"[{vip}]:{VIP_PORT}"
        bpfrouter("service", "add", "udp", key, "check", "none", "--name", "bench")
        for b in backends:
            bpfrouter("service", "backend", "add", "udp", key, b, "--name", "bench")
        out[v] = f"udp {key}"
    return out


def lb_packets(service: str) -> int:
    s = json.loads(bpfrouter("service", "show", "-j", "--name", "bench"))
    return next(x["stats"]["packets"] for x in s if x["service"] == service)


def bench_lb(lab: Lab, hot: dict, packets: int, rounds: int) -> list[dict]:
    """A VIP's packets: one established flow (its connection entry found),
    and a new flow each packet (1M sources, over what the connection table
    holds per CPU, so every packet misses, learns and evicts). Each row
    checks that every router run balanced every packet (the service's
    counter) and forwarded it (the port's). First, what the services cost
    the rest of the family's traffic: the hot forward again, beside them
    (its packets are checked to be balanced by none)."""
    services = add_bench_services(lab)
    rows = []
    before = lb_packets(services[4])
    case = Case("IPv4 forward beside services", 4, ipaddress.ip_address(lab.addr("h2")).packed, hot,
                lo.Reason.FWD_IPV4, lo.Reason.FWD_IPV4)
    rows.append(run_case(case, lab, packets, rounds))
    if lb_packets(services[4]) != before:
        raise BenchError("the forward beside services was balanced")
    # network order (a sum's dtype is native: the order is set after it)
    new_sources = (np.arange(1 << 20, dtype=np.uint32) + (11 << 24)).astype(">u4").tobytes()
    for label, v, srcs in (("IPv4 VIP, established flow", 4, ipaddress.ip_address(lab.addr("h1")).packed),
                           ("IPv4 VIP, a new flow each packet", 4, new_sources),
                           ("IPv6 VIP, established flow", 6, ipaddress.ip_address(lab.addr("h1", 6)).packed)):
        case = Case(label, v, srcs, hot, lo.Reason.FWD_IPV4 if v == 4 else lo.Reason.FWD_IPV6,
                    to=VIP4 if v == 4 else VIP6)
        before = lb_packets(services[v])
        rows.append(run_case(case, lab, packets, rounds))
        balanced = lb_packets(services[v]) - before
        want = case.routers() * rounds * packets * RUNS_PER_LOAD
        if balanced != want:
            raise BenchError(f"{label}: the service balanced {balanced} packets of {want}")
    return rows


def set_bench_rules(lab: Lab, n: int, had: int) -> None:
    """n rules before main that the bench packet (UDP from h1, dport 33434)
    does not match: each selects a source /32, UDP and a port, as a policy
    table of a few hundred tenants would; the agent walks them when this
    returns (the kernel's lookup walks them one by one)."""
    lines = [f"rule del pref {1000 + i}" for i in range(had)]
    lines += [f"rule add pref {1000 + i} from 198.18.{i >> 8}.{i & 255}/32 ipproto udp dport {2000 + i} lookup 200"
              for i in range(n)]
    if lines:
        lab.run("r", ["ip", "-batch", "-"], input="\n".join(lines) + "\n", check=True)
    want = f"{n + 3} rules walked" if n else "default rules"
    deadline = time.monotonic() + 60
    while not json.loads(bpfrouter("rule", "show", "-4", "-j", "--name", "bench"))["ipv4"]["state"].startswith(want):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent did not walk the {n} bench rules")
        time.sleep(0.2)


def bench_per_packet(lab: Lab, quick: bool) -> list[dict]:
    packets, rounds = (200_000, 3) if quick else (1_000_000, 7)
    sizes = {4: 100_000, 6: 23_000} if quick else {4: 1_000_000, 6: 230_000}
    rng = np.random.default_rng(42)
    rows = []
    with netns.entered(lab.router_ns):
        lab_dp = Datapath.open("bench")
        kernel_dp = Datapath.load("bench-kfib", OBJECT, lo.FibMode.KERNEL)
        try:
            ifaces = Interfaces(kernel_dp)
            for name in ("r-eth0", "r-eth1"):
                idx, mac = lab.link("r", name)
                ifaces.configure(idx, mac, 1500)
            hot = {"bpf": lab_dp, "kernel": kernel_dp}
            one = {v: ipaddress.ip_address(lab.addr("h2", v)).packed for v in (4, 6)}
            spread = {net: destinations(rng, [ipaddress.ip_network(net)], packets, 4)
                      for net in ("10.62.0.0/16", "10.63.0.0/16")}
            cases = [Case("hot IPv4 forward", 4, one[4], hot, lo.Reason.FWD_IPV4, lo.Reason.FWD_IPV4),
                     Case("hot IPv6 forward", 6, one[6], hot, lo.Reason.FWD_IPV6, lo.Reason.FWD_IPV6),
                     Case("hot IPv4 no route (pass)", 4, ipaddress.ip_address("198.51.100.1").packed, hot,
                          lo.Reason.PASS_FIB_MISS, lo.Reason.PASS_KERNEL_NOT_FWDED, floor=False, single=False),
                     Case("IPv4 /16, random destinations", 4, spread["10.63.0.0/16"], hot, lo.Reason.FWD_IPV4,
                          lo.Reason.FWD_IPV4),
                     Case(f"IPv4 /16 {ECMP_PATHS}-way ECMP, random dsts", 4, spread["10.62.0.0/16"], hot,
                          lo.Reason.FWD_IPV4, lo.Reason.FWD_IPV4)]
            for case in cases:
                rows.append(run_case(case, lab, packets, rounds))
            had = 0
            for n in RULE_COUNTS:  # after the others: a rule once added leaves the kernel's custom-rules path on
                set_bench_rules(lab, n, had)
                had = n
                rows.append(run_case(Case(f"IPv4 forward, {n} rules before main", 4, one[4], hot, lo.Reason.FWD_IPV4,
                                          lo.Reason.FWD_IPV4, single=False), lab, packets, rounds))
            set_bench_rules(lab, 0, had)
            rows += bench_lb(lab, hot, packets, rounds)
        finally:
            kernel_dp.destroy()
            lab_dp.close()
        for version, size in sizes.items():
            dp, fib, prefixes = cold_datapath(lab, version, size, rng)
            try:
                dests = destinations(rng, prefixes, packets, version)
                label = f"cold IPv{version} forward ({size // 1000}k routes)"
                rows.append(run_case(Case(label, version, dests, {"bpf": dp},
                                          lo.Reason.FWD_IPV4 if version == 4 else lo.Reason.FWD_IPV6),
                                     lab, packets, rounds))
            finally:
                fib.close()
                dp.destroy()
    for r in rows:
        r["packets"], r["rounds"] = packets, rounds
    return rows


def maglev_disruption(trials: int) -> dict:
    """Maglev's disruption: the share of flows (table slots) that move when
    1 of 100 equal backends goes, over `trials` random backend sets, beside
    the minimum (the 1% it carried); and the largest max/avg load."""
    from bpfrouter.lb import maglev
    rng = np.random.default_rng(7)
    out = {}
    for size in (maglev.table_size(100), maglev.SIZES[-3]):
        moved, loads = [], []
        for _ in range(trials):
            addrs = [str(ipaddress.ip_address(int(x))) for x in rng.choice(1 << 24, 100, replace=False) + (10 << 24)]
            members = [maglev.Member(a, 1) for a in addrs]
            full = [addrs[i] for i in maglev.build(members, size)]
            gone = int(rng.integers(100))
            rest = members[:gone] + members[gone + 1:]
            after = [rest[i].key for i in maglev.build(rest, size)]
            moved.append(maglev.moved(full, after))
            loads.append(max(maglev.shares(maglev.build(members, size), 100)) * 100)
        out[str(size)] = {"moved_mean": float(np.mean(moved)), "moved_max": float(np.max(moved)),
                          "minimum": 0.01, "max_over_avg_load": float(np.max(loads))}
    return {"backends": 100, "removed": 1, "trials": trials, "table_sizes": out}


def busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = f.readline().split()  # aggregate "cpu" line
    return sum(int(x) for x in fields[1:8])  # user..softirq, no idle/iowait


def sink_count(sink_map) -> int:
    return sum(v.value for v in sink_map.lookup(lo.u32(0)))


def load_baseline(prog: str, frame: bytes | None = None):
    obj = BpfObject(BASELINE)
    obj.only_programs(prog)
    if frame is not None:
        obj.set_rodata("tx_frame", (ctypes.c_uint8 * len(frame))(*frame))
    obj.load()
    return obj


def live_frames_refusal(lab: Lab) -> str | None:
    """Why this kernel will not send live frames from BPF_PROG_TEST_RUN (the
    generator of the lab rows), or None when it will."""
    h1_idx, _ = lab.link("h1", "h1-eth0")
    with load_baseline("xdp_pass") as obj:
        try:
            netns.run_in(lab.ns("h1"), lambda: obj.program("xdp_pass").test_run(
                bytes(60), ingress_ifindex=h1_idx, repeat=1, flags=BPF_F_TEST_XDP_LIVE_FRAMES))
        except BpfError as e:
            return f"this kernel refuses BPF_F_TEST_XDP_LIVE_FRAMES ({os.strerror(e.errno)})"
    return None


def bench_forwarding(lab: Lab, packets: int, rounds: int) -> list[dict]:
    """Kernel forwarding, the minimal XDP forwarder and bpfrouter: the same
    live-frames generator in h1, the same topology, a counting XDP sink at h2
    (packets that really arrived)."""
    r_idx, r_mac = lab.link("r", "r-eth0")
    h1_idx, h1_mac = lab.link("h1", "h1-eth0")
    h2_idx, h2_mac = lab.link("h2", "h2-eth0")
    for v in (4, 6):
        lab.run("h1", ["ping", "-c", "2", "-i", "0.2", lab.addr("h2", v)], check=True)
    # A veth takes XDP frames only into NAPI: GRO on the router port gives the
    # kernel-forwarding run the same receive path the XDP run has.
    lab.run("r", ["ethtool", "-K", "r-eth0", "gro", "on"], check=True)
    # The sink on h2 drops everything, ARP too: were the router's entry for h2
    # to expire mid-run, it could never be resolved again. Pin it.
    lab.run("r", ["ip", "neigh", "replace", lab.addr("h2"), "lladdr", ":".join(f"{b:02x}" for b in h2_mac),
                  "dev", "r-eth1", "nud", "permanent"], check=True)
    frame = udp_probe(lab.addr("h1"), lab.addr("h2"), r_mac, src_mac=h1_mac, payload=bytes(18))
    gen_obj = load_baseline("xdp_tx", frame)
    gen = gen_obj.program("xdp_tx")
    far = load_baseline("xdp_count_drop")
    far_link = netns.run_in(lab.ns("h2"), Link.create_xdp, far.program("xdp_count_drop"), h2_idx,
                            XDP_FLAGS_DRV_MODE)

    def send(n: int) -> float:
        os.sched_setaffinity(0, {0})
        t = time.monotonic()
        gen.test_run(frame, ingress_ifindex=h1_idx, repeat=n, flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=64)
        return time.monotonic() - t

    def measure(case: str, sink_map) -> dict:
        samples = []
        for _ in range(rounds):
            n0, j0 = sink_count(sink_map), busy_jiffies()
            dt = netns.run_in(lab.ns("h1"), send, packets)
            got, jiffies = sink_count(sink_map) - n0, busy_jiffies() - j0
            samples.append((got / dt, jiffies * (1e9 / os.sysconf("SC_CLK_TCK")) / max(got, 1), got / packets))
        pps, cpu, delivered = (statistics.median(x) for x in zip(*samples, strict=True))
        if delivered < 0.5:
            raise SystemExit(f"bench setup wrong: {case}: only {delivered:.0%} of the packets arrived")
        return {"case": case, "delivered_pps": pps, "cpu_ns_per_packet": cpu, "delivered_fraction": delivered}

    rows = []
    try:
        floor_obj = load_baseline("xdp_count_drop")
        floor_link = netns.run_in(lab.router_ns, Link.create_xdp, floor_obj.program("xdp_count_drop"), r_idx,
                                  XDP_FLAGS_DRV_MODE)
        rows.append(measure("generator floor (sink on the router port)",
                            floor_obj.map("sink_packets", lo.u32, lo.u64)))
        floor_link.close()
        floor_obj.close()
        far_map = far.map("sink_packets", lo.u32, lo.u64)
        fwd0 = lab.kernel_forwarded()
        rows.append(measure("kernel forwarding (no XDP on the router)", far_map))
        rows[-1]["kernel_forwarded"] = lab.kernel_forwarded() - fwd0
        r1_idx, r1_mac = lab.link("r", "r-eth1")
        floor = netns.run_in(lab.router_ns, Floor, r1_idx, h2_mac, r1_mac)
        floor_link = netns.run_in(lab.router_ns, Link.create_xdp, floor.program, r_idx, XDP_FLAGS_DRV_MODE)
        try:
            before = floor.forwarded()
            rows.append(measure("minimal XDP forwarder (the floor)", far_map))
            rows[-1]["floor_forwarded"] = floor.forwarded() - before
        finally:
            floor_link.close()
            floor.close()
        bpfrouter("up", "r-eth0", "r-eth1", "--name", "bench-fwd", netns_name=lab.router_ns)
        try:
            fwd0 = lab.kernel_forwarded()
            rows.append(measure("bpfrouter XDP, BPF FIB", far_map))
            rows[-1]["kernel_forwarded"] = lab.kernel_forwarded() - fwd0
        finally:
            bpfrouter("down", "--name", "bench-fwd")
    finally:
        far_link.close()
        far.close()
        gen_obj.close()
    floor_ns = rows[0]["cpu_ns_per_packet"]
    for r in rows:
        r["minus_floor_ns"] = r["cpu_ns_per_packet"] - floor_ns
    return rows


CAPTURE_MAPS = ("capture_cfg", "capture_scratch", "capture_ring")


def _masked(insns: bytes) -> bytes:
    """Translated instructions with every 64-bit immediate zeroed: they hold
    map ids and addresses, which differ between two loads of the same code."""
    out = bytearray(insns)
    i = 0
    while i + 16 <= len(out):
        if out[i] == 0x18:  # BPF_LD | BPF_IMM | BPF_DW: two slots
            out[i + 4:i + 8] = out[i + 12:i + 16] = bytes(4)
            i += 16
        else:
            i += 8
    return bytes(out)


def idle_capture_hook() -> dict:
    """The capture hook's cost while no capture runs: the router's attached
    chain, loaded with the capture observer and without it. The same
    translated instructions in every program of the chain and no reference
    to a capture map mean the hook is not in it: its cost is zero
    instructions, by construction, where a timing could only show this VM's
    noise. The chain with the hook is swapped in (bpf_link_update of its
    entry) only while a capture runs."""
    loaded = {}
    for label, observe in (("with", lo.OBS_F_EVENTS | lo.OBS_F_FLOWS | lo.OBS_F_CAPTURE),
                           ("without", lo.OBS_F_EVENTS | lo.OBS_F_FLOWS)):
        dp = Datapath.load(f"bench-hook-{label}", OBJECT, lo.FibMode.BPF, observe=observe)
        try:
            capture_maps = {map_info(dp.maps[m].fd).id for m in CAPTURE_MAPS}
            idle = dp.chain_programs()
            loaded[label] = ([_masked(prog_xlated(p.fd)) for p in idle],
                             {m for p in idle for m in prog_map_ids(p.fd)} & capture_maps)
            if label == "with":
                hooked = dp.chain_programs(capture=True)
                hooked_len = sum(len(prog_xlated(p.fd)) // 8 for p in hooked)
                idle += hooked
            for p in idle:
                p.close()
        finally:
            dp.destroy()
    (idle, idle_capture_maps), (plain, _) = loaded["with"], loaded["without"]
    return {"idle_program_instructions": sum(len(x) for x in idle) // 8,
            "without_capture_observer_instructions": sum(len(x) for x in plain) // 8,
            "identical": idle == plain, "capture_maps_referenced": len(idle_capture_maps),
            "capture_program_instructions": hooked_len,
            "idle_hook_instructions": 0 if idle == plain and not idle_capture_maps else None}


def stage_budget() -> dict:
    """What the verifier spends on each stage of the chain `bpfrouter up`
    loads (BPF FIB, every observer: the attached chain and the capture
    chain), and on the same stages as one program: instructions processed
    (bpf_prog_info.verified_insns) and the stack of each function
    (BPF_LOG_STATS' "stack depth" line; their sum bounds the deepest call
    chain)."""
    out = {}
    for label, path, capture in (("staged", OBJECT, False), ("staged, capture chain", OBJECT, True),
                                 ("single program", ROUTER_SINGLE, False)):
        cfg = ChainConfig(lo.FibMode.BPF, lo.FibImpl.DIR, sum(lo.OBSERVERS.values()), capture)
        with load_chain(path, cfg, keep_stats=True) as chain:
            out[label] = chain.budget()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    ap.add_argument("--quick", action="store_true", help="fewer packets and rounds, smaller tables")
    args = ap.parse_args()
    packets, rounds = (500_000, 3) if args.quick else (3_000_000, 5)
    lab = Lab("bench")
    lab.up()
    try:
        start_lab_router(lab, "bench")
        for v in (4, 6):
            lab.run("h1", ["ping", "-c", "1", lab.addr("h2", v)], check=True)
        add_ecmp_routes(lab)
        per_packet = bench_per_packet(lab, args.quick)
        disruption = maglev_disruption(5 if args.quick else 20)
        hook = idle_capture_hook()
        budget = stage_budget()
        bpfrouter("down", "--name", "bench")
        refused = live_frames_refusal(lab)
        fwd_rows = [] if refused else bench_forwarding(lab, packets, rounds)
    finally:
        lab.down()
    result = {
        "provenance": provenance("make bench" + (" ARGS=--quick" if args.quick else "")),
        "per_packet": {"statistic": "fastest run over the rounds (each row's 'median' beside it)",
                       "method": "pktbench.bpf.c: one BPF_PROG_TEST_RUN, each run restores "
                       "the frame with its next destination and tail-calls the program; ns per packet above the "
                       "harness alone", "rows": per_packet},
        "maglev": disruption,
        "idle_capture_hook": hook, "capture_hook_target_ns": 2, "observers_target_extra_ns": 15,
        "stage_budget": {"verifier_limit_insns": 1_000_000, "stack_limit_bytes": 512, "programs": budget},
        "staged_cost_limit": STAGED_COST_LIMIT,
        "lab_forwarding": {"packets_per_round": packets, "rounds": rounds, "statistic": "median",
                           "not_run": refused,
                           "generator": "BPF_PROG_TEST_RUN live frames (XDP_TX) in h1, 60-byte UDP/IPv4, "
                                        "batch 64, pinned to cpu0",
                           "rows": fwd_rows},
    }
    saved = save("latest.json", result)
    if args.json:
        print(json.dumps(result))
        return
    report(result, saved)


def report(r: dict, saved: Path) -> None:
    p = r["provenance"]
    print(f"{p['command']} at {p['commit']} on {p['cpu']} ({p['cpus']} CPUs, kernel {p['kernel']})")
    rows = r["per_packet"]["rows"]
    print(f"\nwhat a packet pays: the attached XDP program, parse to verdict, ns per packet "
          f"({rows[0]['packets']} packets per run,\nfastest run of {rows[0]['rounds']} rounds of fresh loads; "
          f"every packet checked through the counters):")
    print(f"  {'case':34} {'floor':>6} {'bpfrouter':>9} {'/floor':>7} {'kernel FIB':>10}")
    for x in rows:
        floor = x.get("floor")
        ratio = f"{x['bpfrouter'] / floor:6.1f}x" if floor else f"{'-':>7}"
        kern = f"{x['kernel FIB']:10.1f}" if "kernel FIB" in x else f"{'-':>10}"
        print(f"  {x['case']:34} {floor if floor is not None else float('nan'):6.1f} {x['bpfrouter']:9.1f} "
              f"{ratio} {kern}")
    print("  (floor: the minimal XDP forwarder, one fixed next hop; bpfrouter: the program `up` attaches, flows "
          "and events on;\n   kernel FIB: the same with bpf_fib_lookup; hot: the lab's routes, one destination; "
          "cold: a full table,\n   a random destination per packet, each a new flow; "
          f"the harness's own {rows[0]['harness_ns']:.1f} ns is taken off)")
    by_rules = {int(x["case"].split(", ")[1].split()[0]): x for x in rows if "rules before main" in x["case"]}
    if by_rules:
        print("\npolicy rules the packet walks past before main, ns per packet (the same rules in the kernel):")
        print(f"  {'rules':>6} {'bpfrouter':>9} {'kernel FIB':>10} {'kernel/bpfrouter':>17}")
        for n, x in sorted(by_rules.items()):
            print(f"  {n:6d} {x['bpfrouter']:9.1f} {x['kernel FIB']:10.1f} {x['kernel FIB'] / x['bpfrouter']:17.2f}")
        if 10 in by_rules and 1000 in by_rules:
            print(f"  (1000 rules cost {by_rules[1000]['bpfrouter'] / by_rules[10]['bpfrouter']:.2f}x what 10 cost; "
                  "target <= 2x. The rule walk is classified by per-field bit vectors)")
    fwd = {x["case"]: x for x in rows}
    vip = [x for x in rows if "VIP" in x["case"] or "beside services" in x["case"]]
    if vip:
        print("\nthe load balancer: a VIP's packet (Maglev, connection table, IPIP/IPv6 encapsulation, then the "
              "route to its backend), and a packet\nto another address of a family with services, ns per packet:")
        print(f"  {'case':34} {'floor':>6} {'bpfrouter':>9} {'plain forward':>13} {'extra':>6}")
        for x in vip:
            plain = fwd["hot IPv4 forward" if "IPv4" in x["case"] else "hot IPv6 forward"]["bpfrouter"]
            print(f"  {x['case']:34} {x['floor']:6.1f} {x['bpfrouter']:9.1f} {plain:13.1f} "
                  f"{x['bpfrouter'] - plain:6.1f}")
        print("  (plain forward: the hot forward of the same family above; new flow: 1M clients over a table "
              "that holds\n   an eighth of them per CPU, so each packet misses, learns and evicts. IPVS: not in this "
              "kernel, CONFIG_IP_VS unset)")
    mg = r.get("maglev")
    if mg:
        print(f"\nMaglev disruption: {mg['removed']} of {mg['backends']} equal backends removed, "
              f"{mg['trials']} random backend sets:")
        print(f"  {'table size':>10} {'flows moved':>11} {'worst':>6} {'minimum':>8} {'max/avg load':>13}")
        for size, m in mg["table_sizes"].items():
            print(f"  {size:>10} {100 * m['moved_mean']:10.2f}% {100 * m['moved_max']:5.2f}% "
                  f"{100 * m['minimum']:7.2f}% {m['max_over_avg_load']:13.3f}")
    print("\nthe observers' share, ns per packet: the program compiled without them, with one, with both:")
    print(f"  {'case':34} {'none':>6} {'flows':>6} {'events':>7} {'both':>6} {'both +':>7}")
    for x in rows:
        print(f"  {x['case']:34} {x['no observers']:6.1f} {x['flows']:6.1f} {x['events']:7.1f} "
              f"{x['bpfrouter']:6.1f} {x['bpfrouter'] - x['no observers']:7.1f}")
    print(f"  (target: both <= {r['observers_target_extra_ns']} ns extra on a packet of a known flow)")
    print("\nthe chain of stages against the same stages as one program (router_single.bpf.o), ns per packet:")
    print(f"  {'case':34} {'single':>7} {'staged':>7} {'ratio':>6} {'median':>7}")
    for x in rows:
        if SINGLE not in x:
            continue
        ratio, med = x["bpfrouter"] / x[SINGLE], x["median"]["bpfrouter"] / x["median"][SINGLE]
        flag = "" if ratio <= r["staged_cost_limit"] else "  OVER"
        print(f"  {x['case']:34} {x[SINGLE]:7.1f} {x['bpfrouter']:7.1f} {ratio:6.2f} {med:7.2f}{flag}")
    print(f"  (staged: the chain `up` attaches, flows and events on; ratio of the fastest runs, then of the medians;\n"
          f"   limit {r['staged_cost_limit']:.2f})")
    sb = r["stage_budget"]
    print(f"\nverifier budget per program (limit {sb['verifier_limit_insns']} instructions, "
          f"{sb['stack_limit_bytes']} stack bytes each):")
    print(f"  {'chain':22} {'program':22} {'insns':>8} {'stack':>6}  frames")
    for label, progs in sb["programs"].items():
        for name, v in progs.items():
            frames = "+".join(map(str, v.get("stack_frames") or [])) or "-"
            print(f"  {label:22} {name:22} {v['verified_insns']:8d} {v.get('stack_depth') or 0:6d}  {frames}")
    hook = r["idle_capture_hook"]
    same = "identical to" if hook["identical"] else "DIFFERENT from"
    print(f"\nidle capture hook: {hook['idle_hook_instructions']} instructions. The attached chain "
          f"({hook['idle_program_instructions']} instructions) is {same} the one built without the capture "
          f"observer and uses {hook['capture_maps_referenced']} capture maps; the chain with the hook "
          f"({hook['capture_program_instructions']} instructions) runs only while a capture does.")
    lf = r["lab_forwarding"]
    if lf["not_run"]:
        print(f"\nlab forwarding: not run here: {lf['not_run']}")
        print(f"(saved to {saved})")
        return
    print(f"\nlab forwarding, median of {lf['rounds']} x {lf['packets_per_round']} packets, same generator and "
          f"topology:")
    print(f"  {'case':44} {'Mpps':>7} {'cpu ns/pkt':>10} {'- floor':>8} {'kernel fwd':>10}")
    for x in lf["rows"]:
        print(f"  {x['case']:44} {x['delivered_pps'] / 1e6:7.3f} {x['cpu_ns_per_packet']:10.0f} "
              f"{x['minus_floor_ns']:8.0f} {x.get('kernel_forwarded', '-'):>10}")
    rows_by = {x["case"].split(" ")[0]: x for x in lf["rows"]}
    k, f, x = rows_by["kernel"], rows_by["minimal"], rows_by["bpfrouter"]
    print(f"\nbpfrouter: {x['delivered_pps'] / k['delivered_pps']:.2f}x the kernel's packet rate and "
          f"{x['delivered_pps'] / f['delivered_pps']:.2f}x the minimal forwarder's; above the generator floor, "
          f"{k['minus_floor_ns'] / x['minus_floor_ns']:.2f}x less CPU per packet than the kernel")
    print(f"(saved to {saved})")


if __name__ == "__main__":
    main()
