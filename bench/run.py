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
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bpfrouter import netns  # noqa: E402
from bpfrouter.bpf import BPF_F_TEST_XDP_LIVE_FRAMES, BpfObject, Link, XDP_FLAGS_DRV_MODE  # noqa: E402
from bpfrouter.datapath import Datapath  # noqa: E402
from bpfrouter.datapath import layout as lo  # noqa: E402
from bpfrouter.interfaces import Interfaces  # noqa: E402
from bpfrouter.lab import Lab  # noqa: E402
from bpfrouter.packet import udp_probe  # noqa: E402
from common import bpfrouter, save, start_lab_router  # noqa: E402

BASELINE = str(ROOT / "build" / "baseline.bpf.o")
OBJECT = str(ROOT / "build" / "router.bpf.o")



def ns_per_packet(prog, frame: bytes, ifindex: int, repeat: int, rounds: int) -> float:
    runs = [prog.test_run(frame, ingress_ifindex=ifindex, repeat=repeat).duration_ns for _ in range(rounds)]
    return statistics.median(runs)


def bench_prog_test_run(lab: Lab, repeat: int, rounds: int) -> list[dict]:
    r_eth0, r_mac = lab.link("r", "r-eth0")
    v4 = udp_probe(lab.addr("h1"), lab.addr("h2"), r_mac)
    v6 = udp_probe(lab.addr("h1", 6), lab.addr("h2", 6), r_mac)
    miss = udp_probe(lab.addr("h1"), "198.51.100.1", r_mac)
    rows = []
    with netns.entered(lab.router_ns):
        with BpfObject(BASELINE) as base:
            base.only_programs("xdp_pass")
            base.load()
            empty = base.program("xdp_pass")
            rows.append({"case": "empty XDP program (baseline)", "ns": ns_per_packet(empty, v4, r_eth0, repeat, rounds)})
        dp = Datapath.open("bench")
        kernel_dp = Datapath.load("bench-kfib", OBJECT, lo.FibMode.KERNEL)
        try:
            ifaces = Interfaces(kernel_dp)
            for name in ("r-eth0", "r-eth1"):
                idx, mac = lab.link("r", name)
                ifaces.configure(idx, mac, 1500)
            for label, prog, frame, want in (
                    ("bpfrouter, BPF FIB, IPv4 forward", dp.program, v4, 4),
                    ("bpfrouter, BPF FIB, IPv6 forward", dp.program, v6, 4),
                    ("bpfrouter, BPF FIB, IPv4 no route (pass)", dp.program, miss, 2),
                    ("bpfrouter, kernel FIB, IPv4 forward", kernel_dp.program, v4, 4),
                    ("bpfrouter, kernel FIB, IPv6 forward", kernel_dp.program, v6, 4)):
                got = prog.test_run(frame, ingress_ifindex=r_eth0).retval
                if got != want:
                    raise SystemExit(f"bench setup wrong: {label} returned XDP action {got}, expected {want}")
                rows.append({"case": label, "ns": ns_per_packet(prog, frame, r_eth0, repeat, rounds)})
        finally:
            kernel_dp.destroy()
            dp.close()
    base_ns = rows[0]["ns"]
    for r in rows:
        r["minus_empty_ns"] = r["ns"] - base_ns
    return rows


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
    h2_idx, _ = lab.link("h2", "h2-eth0")
    for v in (4, 6):
        lab.run("h1", ["ping", "-c", "2", "-i", "0.2", lab.addr("h2", v)], check=True)
    # A veth takes XDP frames only into NAPI: GRO on the router port gives the
    # kernel-forwarding run the same receive path the XDP run has.
    lab.run("r", ["ethtool", "-K", "r-eth0", "gro", "on"], check=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, shorter traffic runs")
    args = ap.parse_args()
    repeat, rounds = (200_000, 3) if args.quick else (2_000_000, 5)
    packets = 500_000 if args.quick else 3_000_000
    lab = Lab("bench")
    lab.up()
    try:
        start_lab_router(lab, "bench")
        for v in (4, 6):
            lab.run("h1", ["ping", "-c", "1", lab.addr("h2", v)], check=True)
        prog_rows = bench_prog_test_run(lab, repeat, rounds)
        bpfrouter("down", "--name", "bench")
        fwd_rows = bench_forwarding(lab, packets, rounds)
    finally:
        lab.down()
    result = {
        "machine": {"kernel": os.uname().release, "cpus": os.cpu_count()},
        "prog_test_run": {"repeat": repeat, "rounds": rounds, "statistic": "median", "rows": prog_rows},
        "lab_forwarding": {"packets_per_round": packets, "rounds": rounds, "statistic": "median",
                           "generator": "BPF_PROG_TEST_RUN live frames (XDP_TX) in h1, 60-byte UDP/IPv4, "
                                        "batch 64, pinned to cpu0",
                           "rows": fwd_rows},
    }
    saved = save("latest.json", result)
    if args.json:
        print(json.dumps(result))
        return
    print(f"per-packet cost, BPF_PROG_TEST_RUN, median of {rounds} x {repeat} runs:")
    print(f"  {'case':44} {'ns/pkt':>8} {'- empty':>8}")
    for r in prog_rows:
        print(f"  {r['case']:44} {r['ns']:8.1f} {r['minus_empty_ns']:8.1f}")
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
