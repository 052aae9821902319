#!/usr/bin/env python3
"""bpfrouter benchmarks (`make bench`, `make bench ARGS="--json"`).

1. Per-packet cost of the XDP program through BPF_PROG_TEST_RUN, next to an
   empty XDP program measured in the same run.
2. Lab forwarding: the same traffic through the same topology, forwarded
   once by the kernel and once by bpfrouter's XDP path, after a floor run
   where a bare sink replaces the router. The generator is a live-frames
   BPF_PROG_TEST_RUN (XDP_TX) in h1 pinned to cpu0; batches of 64 frames
   never overrun the veth's 256-slot ring, and the receive work runs in
   softirq on the same core, so delivered packets/s is the whole path's
   rate. Packets are counted where they arrive (an XDP sink on h2), and CPU
   time per packet is taken over both cores from /proc/stat; the
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bpfrouter import netns  # noqa: E402
from bpfrouter.bpf import (BPF_F_TEST_XDP_LIVE_FRAMES, BpfObject, Link, XDP_FLAGS_DRV_MODE, map_info,  # noqa: E402
                           prog_map_ids, prog_xlated)
XDP_PASS, XDP_REDIRECT = 2, 4
from bpfrouter.datapath import Datapath, RouterMeta  # noqa: E402
from bpfrouter.datapath import layout as lo  # noqa: E402
from bpfrouter.interfaces import Interfaces  # noqa: E402
from bpfrouter.lab import Lab  # noqa: E402
from bpfrouter.observe import read_counters  # noqa: E402
from bpfrouter.packet import udp_probe  # noqa: E402
from common import Bench, bpfrouter, save, start_lab_router  # noqa: E402

BASELINE = str(ROOT / "build" / "baseline.bpf.o")
OBJECT = str(ROOT / "build" / "router.bpf.o")


RUNS_PER_LOAD = 3  # per-packet figures: the fastest of these runs of each fresh load


def counted(dp: Datapath, ifindex: int, reason: lo.Reason) -> int:
    """Packets the data plane has counted with this ingress and reason."""
    return read_counters(dp, ifindex).get((ifindex, reason), (0, 0))[0]


def bench_prog_test_run(lab: Lab, n: int, rounds: int) -> tuple[list[dict], list[dict]]:
    """Per-packet cost inside the kernel: a bpf_loop in one BPF_PROG_TEST_RUN
    restores the packet (MACs, TTL) and runs the router's pipeline on it, n
    times; the loop and the restore alone are the floor. (The test run's own
    repeat reuses the rewritten packet: after 63 runs every packet is a TTL
    expiry.) The observers' cost: the same loop through variants of the
    program that differ only in which observers are compiled in, on the
    running router's maps, interleaved round by round, each loaded afresh
    every round (JIT placement alone moves a program by several ns). Every
    run checks that all its packets got the case's reason. The capture hook
    is not among them: it is not in the program that runs while no capture
    does (idle_capture_hook)."""
    r_eth0, r_mac = lab.link("r", "r-eth0")
    # version, destination, XDP action, reason with the BPF FIB, reason with the kernel FIB
    cases = {"IPv4 forward": (4, lab.addr("h2"), XDP_REDIRECT, lo.Reason.FWD_IPV4, lo.Reason.FWD_IPV4),
             "IPv6 forward": (6, lab.addr("h2", 6), XDP_REDIRECT, lo.Reason.FWD_IPV6, lo.Reason.FWD_IPV6),
             "IPv4 no route (pass, event)": (4, "198.51.100.1", XDP_PASS, lo.Reason.PASS_FIB_MISS,
                                             lo.Reason.PASS_KERNEL_NOT_FWDED)}
    # "all": what runs while no capture does (idle_capture_hook shows the hook is not in it)
    variants = {"plain": 0, "flows": lo.OBS_F_FLOWS, "events": lo.OBS_F_EVENTS,
                "all": lo.OBS_F_EVENTS | lo.OBS_F_FLOWS}
    fwd_rows, obs_rows = [], []
    with netns.entered(lab.router_ns):
        dp = Datapath.open("bench")
        impl = lo.FibImpl[RouterMeta.load("bench").fib_impl.upper()]
        kernel_dp = Datapath.load("bench-kfib", OBJECT, lo.FibMode.KERNEL)
        try:
            ifaces = Interfaces(kernel_dp)
            for name in ("r-eth0", "r-eth1"):
                idx, mac = lab.link("r", name)
                ifaces.configure(idx, mac, 1500)
            for case, (v, dst, want, bpf_reason, kernel_reason) in cases.items():
                dests = {v: ipaddress.ip_address(dst).packed * n}
                frame = udp_probe(lab.addr("h1", v), dst, r_mac)
                got = dp.program.test_run(frame, ingress_ifindex=r_eth0).retval
                if got != want:
                    raise SystemExit(f"bench setup wrong: {case} returned XDP action {got}, expected {want}")
                runs: dict[str, list[float]] = {k: [] for k in ("floor", "reset", *variants, "kernel FIB")}
                # variant -> data plane, FIB mode, FIB implementation, program, expected reason
                setups = {k: (dp, lo.FibMode.BPF, impl, f"bench_pipeline{v}" if k == "plain" else f"bench_observed{v}",
                              bpf_reason) for k in variants}
                setups["kernel FIB"] = (kernel_dp, lo.FibMode.KERNEL, lo.FibImpl.LPM, f"bench_pipeline{v}",
                                        kernel_reason)
                for _ in range(rounds):
                    # A fresh load per round: JIT placement moves a program's cost by several ns.
                    for k, (on, mode, fib_impl, prog, reason) in setups.items():
                        b = Bench(on, mode, fib_impl, n, r_eth0, frame[:14], dests, observe=variants.get(k, 0),
                                  frame=frame)
                        try:
                            if k == "plain":
                                runs["floor"].append(b.best_ns(f"bench_empty{v}", RUNS_PER_LOAD))
                                runs["reset"].append(b.best_ns(f"bench_pipeline_reset{v}", RUNS_PER_LOAD))
                            before = counted(on, r_eth0, reason)
                            runs[k].append(b.best_ns(prog, RUNS_PER_LOAD))
                            done = counted(on, r_eth0, reason) - before
                            if done != n * RUNS_PER_LOAD:
                                raise SystemExit(f"bench wrong: {case} ({k}) counted {done} of {n * RUNS_PER_LOAD} "
                                                 f"packets as {reason.label}")
                        finally:
                            b.close()
                ns = {k: statistics.median(x) for k, x in runs.items()}
                fwd_rows.append({"case": case, "loop_floor_ns": ns["floor"], "reset_ns": ns["reset"],
                                 "bpf_fib_ns": ns["plain"] - ns["reset"],
                                 "kernel_fib_ns": ns["kernel FIB"] - ns["reset"]})
                obs_rows.append({"case": case, "plain_ns": ns["plain"] - ns["reset"],
                                 "flows_ns": ns["flows"] - ns["reset"], "events_ns": ns["events"] - ns["reset"],
                                 "all_ns": ns["all"] - ns["reset"],
                                 "observers_extra_ns": ns["all"] - ns["plain"]})
        finally:
            kernel_dp.destroy()
            dp.close()
    return fwd_rows, obs_rows


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


def bench_forwarding(lab: Lab, packets: int, rounds: int) -> list[dict]:
    """Kernel forwarding vs XDP: the same live-frames generator in h1, the same
    topology, a counting XDP sink at h2 (packets that really arrived)."""
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
    program, loaded with the capture observer and without it. The same
    translated instructions and no reference to a capture map mean the hook
    is not in it: its cost is zero instructions, by construction, where a
    timing could only show this VM's noise. The program with the hook is
    swapped in (bpf_link_update) only while a capture runs."""
    loaded = {}
    for label, observe in (("with", lo.OBS_F_EVENTS | lo.OBS_F_FLOWS | lo.OBS_F_CAPTURE),
                           ("without", lo.OBS_F_EVENTS | lo.OBS_F_FLOWS)):
        dp = Datapath.load(f"bench-hook-{label}", OBJECT, lo.FibMode.BPF, observe=observe)
        try:
            capture_maps = {map_info(dp.maps[m].fd).id for m in CAPTURE_MAPS}
            loaded[label] = (_masked(prog_xlated(dp.program.fd)), capture_maps & set(prog_map_ids(dp.program.fd)))
            if label == "with":
                hooked_len = len(prog_xlated(dp.capture_program().fd)) // 8
        finally:
            dp.destroy()
    (idle, idle_capture_maps), (plain, _) = loaded["with"], loaded["without"]
    return {"idle_program_instructions": len(idle) // 8, "without_capture_observer_instructions": len(plain) // 8,
            "identical": idle == plain, "capture_maps_referenced": len(idle_capture_maps),
            "capture_program_instructions": hooked_len,
            "idle_hook_instructions": 0 if idle == plain and not idle_capture_maps else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, shorter traffic runs")
    args = ap.parse_args()
    # Per packet: many fresh loads rather than long runs; placement varies by load, not by run.
    loop_n, loop_rounds = (100_000, 3) if args.quick else (300_000, 9)
    packets, rounds = (500_000, 3) if args.quick else (3_000_000, 5)
    lab = Lab("bench")
    lab.up()
    try:
        start_lab_router(lab, "bench")
        for v in (4, 6):
            lab.run("h1", ["ping", "-c", "1", lab.addr("h2", v)], check=True)
        prog_rows, obs_rows = bench_prog_test_run(lab, loop_n, loop_rounds)
        hook = idle_capture_hook()
        bpfrouter("down", "--name", "bench")
        fwd_rows = bench_forwarding(lab, packets, rounds)
    finally:
        lab.down()
    result = {
        "machine": {"kernel": os.uname().release, "cpus": os.cpu_count()},
        "per_packet": {"packets_per_run": loop_n, "rounds": loop_rounds, "statistic": "median",
                       "method": "bpf_loop in one BPF_PROG_TEST_RUN: restore packet, run pipeline; "
                                 "figures are ns above the restore-only loop",
                       "rows": prog_rows},
        "observers": {"packets_per_run": loop_n, "rounds": loop_rounds, "statistic": "median", "rows": obs_rows,
                      "target_extra_ns": 15, "idle_capture_hook": hook, "capture_hook_target_ns": 2},
        "lab_forwarding": {"packets_per_round": packets, "rounds": rounds, "statistic": "median",
                           "generator": "BPF_PROG_TEST_RUN live frames (XDP_TX) in h1, 60-byte UDP/IPv4, "
                                        "batch 64, pinned to cpu0",
                           "rows": fwd_rows},
    }
    saved = save("latest.json", result)
    if args.json:
        print(json.dumps(result))
        return
    print(f"per-packet cost in the kernel, median over {loop_rounds} fresh loads of the fastest of {RUNS_PER_LOAD} "
          f"runs of {loop_n} packets\n(bpf_loop in one BPF_PROG_TEST_RUN), ns per packet above the loop that only "
          f"restores the packet:")
    print(f"  {'case':30} {'loop':>6} {'restore':>8} {'BPF FIB':>8} {'kernel FIB':>10}")
    for r in prog_rows:
        print(f"  {r['case']:30} {r['loop_floor_ns']:6.1f} {r['reset_ns']:8.1f} {r['bpf_fib_ns']:8.1f} "
              f"{r['kernel_fib_ns']:10.1f}")
    print("\nobservers: the same loop through the program with and without them, ns per packet:")
    print(f"  {'case':30} {'plain':>6} {'flows':>6} {'events':>7} {'all':>6} {'all +':>6}")
    for r in obs_rows:
        print(f"  {r['case']:30} {r['plain_ns']:6.1f} {r['flows_ns']:6.1f} {r['events_ns']:7.1f} "
              f"{r['all_ns']:6.1f} {r['observers_extra_ns']:6.1f}")
    print("  (flows, events: that observer alone; all: both, the program attached while no capture runs;"
          "\n   target: all <= 15 ns extra)")
    same = "identical to" if hook["identical"] else "DIFFERENT from"
    print(f"idle capture hook: {hook['idle_hook_instructions']} instructions. The attached program "
          f"({hook['idle_program_instructions']} instructions) is {same} the one built without the capture "
          f"observer and uses {hook['capture_maps_referenced']} capture maps; the program with the hook "
          f"({hook['capture_program_instructions']} instructions) runs only while a capture does.")
    print(f"\nlab forwarding, median of {rounds} x {packets} packets, same generator and topology:")
    print(f"  {'case':44} {'Mpps':>7} {'cpu ns/pkt':>10} {'- floor':>8} {'kernel fwd':>10}")
    for r in fwd_rows:
        print(f"  {r['case']:44} {r['delivered_pps'] / 1e6:7.3f} {r['cpu_ns_per_packet']:10.0f} "
              f"{r['minus_floor_ns']:8.0f} {r.get('kernel_forwarded', '-'):>10}")
    _, k, x = fwd_rows
    print(f"\nXDP forwarding: {x['delivered_pps'] / k['delivered_pps']:.2f}x the kernel's packet rate, "
          f"{k['minus_floor_ns'] / x['minus_floor_ns']:.2f}x less CPU per packet above the generator floor")
    print(f"(saved to {saved})")


if __name__ == "__main__":
    main()
