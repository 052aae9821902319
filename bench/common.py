"""Helpers shared by the benchmarks: the per-packet harness (pktbench.bpf.o),
the lookup loops (fibbench.bpf.o), the minimal forwarder (the floor), and
program twins loaded onto a running router's maps."""
from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FIBBENCH = str(ROOT / "build" / "fibbench.bpf.o")
PKTBENCH = str(ROOT / "build" / "pktbench.bpf.o")
BASELINE = str(ROOT / "build" / "baseline.bpf.o")
ROUTER = str(ROOT / "build" / "router.bpf.o")
ROUTER_SINGLE = str(ROOT / "build" / "router_single.bpf.o")  # the same stages inlined into one program
sys.path.insert(0, str(ROOT))

from bpfrouter.bpf import BpfObject, Program  # noqa: E402
from bpfrouter.datapath import Datapath  # noqa: E402
from bpfrouter.datapath import layout as lo  # noqa: E402
from bpfrouter.datapath.datapath import SECTION_MAPS  # noqa: E402
from bpfrouter.datapath.stages import Chain, ChainConfig, load_chain  # noqa: E402
from bpfrouter.fib import TABLE_MAIN, Nexthop, Route, RouteType  # noqa: E402
from bpfrouter.observe import read_counters  # noqa: E402


class BenchError(SystemExit):
    """A benchmark whose packets did not get the verdict its row claims: its figure would be a lie."""

    def __init__(self, msg: str):
        super().__init__(f"bench wrong: {msg}")


def bpfrouter(*args: str, netns_name: str | None = None) -> str:
    """Run the real `bpfrouter` command, as a user would; its error stops the benchmark."""
    argv = [sys.executable, "-m", "bpfrouter"] + (["--netns", netns_name] if netns_name else []) + list(args)
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"bench setup failed: bpfrouter {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def start_lab_router(lab, name: str) -> None:
    bpfrouter("up", "r-eth0", "r-eth1", "--name", name, netns_name=lab.router_ns)


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(result, indent=1))
    return path


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def git_commit() -> str:
    p = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=7"],
                       capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def provenance(command: str) -> dict:
    """What every published figure names: the command, the commit, the CPU."""
    return {"command": command, "commit": git_commit(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "kernel": os.uname().release}


def counted(dp: Datapath, ifindex: int, reason: lo.Reason) -> int:
    """Packets the data plane has counted with this ingress and reason."""
    return read_counters(dp, ifindex).get((ifindex, reason), (0, 0))[0]


# --- program twins ---------------------------------------------------------------------------
def router_twin(dp: Datapath, fib_mode: lo.FibMode, fib_impl: lo.FibImpl,
                observe: int = lo.OBS_F_EVENTS | lo.OBS_F_FLOWS, single: bool = False) -> Chain:
    """router.bpf.o's chain of stages (single: router_single.bpf.o, the same
    stages as one program) loaded afresh onto a running data plane's maps,
    with a program array of its own: another JIT placement of the same code
    (placement alone moves a program's cost by several ns), or a variant
    compiled with other observers."""
    reuse = {SECTION_MAPS.get(name, name): m.fd for name, m in dp.maps.items()}
    return load_chain(ROUTER_SINGLE if single else ROUTER, ChainConfig(fib_mode, fib_impl, observe), reuse=reuse)


# --- the minimal forwarder -------------------------------------------------------------------
class Floor:
    """baseline.bpf.o's xdp_fwd_floor: every packet to one fixed next hop.
    Created inside the network namespace of its egress port (the devmap
    resolves the ifindex there)."""

    def __init__(self, egress_ifindex: int, dmac: bytes, smac: bytes):
        self.obj = BpfObject(BASELINE)
        try:
            self.obj.only_programs("xdp_fwd_floor")
            self.obj.set_rodata("floor_dmac", (ctypes.c_uint8 * 6)(*dmac))
            self.obj.set_rodata("floor_smac", (ctypes.c_uint8 * 6)(*smac))
            self.obj.set_rodata("floor_ifindex", ctypes.c_uint32(egress_ifindex))
            self.obj.load()
            self.obj.map("floor_ports", lo.u32, lo.u32).update(lo.u32(egress_ifindex), lo.u32(egress_ifindex))
        except BaseException:
            self.obj.close()
            raise
        self.program = self.obj.program("xdp_fwd_floor")

    def forwarded(self) -> int:
        return sum(v.value for v in self.obj.map("floor_forwarded", lo.u32, lo.u64).lookup(lo.u32(0)))

    def close(self) -> None:
        self.obj.close()


# --- the per-packet harness ------------------------------------------------------------------
class HarnessState(ctypes.Structure):
    _fields_ = [("next", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("runs", ctypes.c_uint64)]


def ipv4_checksums(header: bytes, dests: np.ndarray) -> np.ndarray:
    """The IPv4 header checksum of `header` (20 bytes, TTL 64) with each
    destination (uint32, host order) in place of its own."""
    words = np.frombuffer(header[:10] + b"\0\0" + header[12:16] + bytes(4), ">u2").astype(np.uint64)
    words[4] = (words[4] & 0x00FF) | (64 << 8)  # TTL 64, as the harness writes it
    s = int(words.sum()) + (dests >> np.uint64(16)) + (dests & np.uint64(0xFFFF))
    s = (s & 0xFFFF) + (s >> np.uint64(16))
    s = (s & 0xFFFF) + (s >> np.uint64(16))
    return (~s & np.uint64(0xFFFF)).astype(np.uint16)


RUNS_PER_LOAD = 3
XDP_PASS, XDP_REDIRECT = 2, 4


def write_destinations(obj: BpfObject, version: int, dests: bytes, header: bytes | None = None) -> None:
    """Network-order addresses into bench_dst4/6 (include/benchdst.h); for
    IPv4 with `header`, each with the checksum of that header carrying it."""
    m = obj.map(f"bench_dst{version}", lo.u32, ctypes.c_uint8 * (8 if version == 4 else 16))
    if version == 4:
        rec = np.zeros(len(dests) // 4, [("addr", ">u4"), ("check", ">u2"), ("pad", "u2")])
        rec["addr"] = np.frombuffer(dests, ">u4")
        if header is not None:
            rec["check"] = ipv4_checksums(header, rec["addr"].astype(np.uint64))
        dests = rec.tobytes()
    mm = m.mmap()
    try:
        mm[: len(dests)] = dests
    finally:
        mm.close()


class PacketBench:
    """Runs a target XDP program on `frame`, with the next of `dests` as its
    destination each time, `packets` times in one BPF_PROG_TEST_RUN
    (pktbench.bpf.c). dests: network-order addresses, 4 or 16 bytes each;
    with sources=True, they are the packets' sources instead (a new flow
    each, to the frame's destination)."""

    def __init__(self, frame: bytes, dests: bytes, version: int, sources: bool = False):
        width = 4 if version == 4 else 16
        self.n = len(dests) // width
        if not 1 <= self.n <= 1 << 21 or len(dests) % width:
            raise ValueError(f"{len(dests)} bytes of IPv{version} destinations")
        self.frame, self.version = frame, version
        self.prog_name = f"bench_packet{version}"
        self.obj = BpfObject(PKTBENCH)
        try:
            self.obj.only_programs(self.prog_name)
            self.obj.set_rodata("bench_n", ctypes.c_uint32(self.n))
            self.obj.set_rodata("bench_eth", (ctypes.c_uint8 * 14)(*frame[:14]))
            self.obj.set_rodata("bench_len", ctypes.c_uint32(len(frame)))
            self.obj.set_rodata("bench_set_src", ctypes.c_uint8(sources))
            self.obj.load()
            header = frame[14:34]
            if sources:  # the checksum is a sum: the varying word may take the destination's place
                header = header[:12] + header[16:20] + header[12:16]
            write_destinations(self.obj, version, dests, header)
        except BaseException:
            self.obj.close()
            raise
        self.program = self.obj.program(self.prog_name)
        self.state = self.obj.map(".data.bench", lo.u32, HarnessState)
        self.target = self.obj.map("bench_target", lo.u32, lo.u32)
        self.last_action = -1

    def run(self, target: Program, ingress_ifindex: int, packets: int) -> float:
        """ns per packet, the fastest of RUNS_PER_LOAD runs of `packets`: the
        harness's reset plus the target, from its first instruction to its
        verdict. Interference (this VM's neighbours, the other core) only
        ever adds time, and it comes in phases of seconds that double a
        figure, so the fastest run is the figure. Checks that every run
        reached the target; the caller checks the target's own counters for
        RUNS_PER_LOAD * packets."""
        self.target.update(lo.u32(0), lo.u32(target.fd))
        before = self.state.lookup(lo.u32(0)).runs
        best = float("inf")
        for _ in range(RUNS_PER_LOAD):
            res = self.program.test_run(self.frame, ingress_ifindex=ingress_ifindex, repeat=packets)
            best = min(best, float(res.duration_ns))
        self.last_action = res.retval  # the last packet's XDP action
        reached = self.state.lookup(lo.u32(0)).runs - before
        if reached != packets * RUNS_PER_LOAD:
            raise BenchError(f"{self.prog_name}: {packets * RUNS_PER_LOAD} runs asked, {reached} reached the "
                             f"program under test")
        return best

    def run_harness(self, ingress_ifindex: int, packets: int) -> float:
        """The harness's own cost: the reset and a tail call into xdp_pass."""
        with BpfObject(BASELINE) as base:
            base.only_programs("xdp_pass")
            base.load()
            return self.run(base.program("xdp_pass"), ingress_ifindex, packets)

    def run_floor(self, floor: "Floor", ingress_ifindex: int, packets: int) -> float:
        """The floor, every packet checked forwarded through its counter."""
        before = floor.forwarded()
        ns = self.run(floor.program, ingress_ifindex, packets)
        forwarded = floor.forwarded() - before
        if forwarded != packets * RUNS_PER_LOAD or self.last_action != XDP_REDIRECT:
            raise BenchError(f"the floor forwarded {forwarded} of {packets * RUNS_PER_LOAD} packets")
        return ns

    def run_router(self, dp: Datapath, fib_mode: lo.FibMode, fib_impl: lo.FibImpl, observe: int,
                   ingress_ifindex: int, packets: int, reason: lo.Reason, single: bool = False) -> float:
        """A fresh twin of dp's chain (single: the one-program build): every
        packet must be counted with `reason` on the ingress port, and the
        last get that reason's action."""
        with router_twin(dp, fib_mode, fib_impl, observe, single) as twin:
            before = counted(dp, ingress_ifindex, reason)
            ns = self.run(twin.entry, ingress_ifindex, packets)
            done = counted(dp, ingress_ifindex, reason) - before
        want = XDP_REDIRECT if reason.verdict == "redirect" else XDP_PASS
        if done != packets * RUNS_PER_LOAD or self.last_action != want:
            raise BenchError(f"{self.prog_name} through {fib_mode.name.lower()}/{fib_impl.name.lower()} "
                             f"(observers {observe}): {done} of {packets * RUNS_PER_LOAD} packets counted as "
                             f"{reason.label}, the last one got XDP action {self.last_action}")
        return ns

    def close(self) -> None:
        self.obj.close()


def fastest_above_harness(times: dict[str, list[float]]) -> dict:
    """Each target's fastest run (interference only adds time) and its
    median, both less the harness's own cost (times["harness"])."""
    fast = {k: min(v) for k, v in times.items()}
    med = {k: median(v) for k, v in times.items()}
    targets = [k for k in times if k != "harness"]
    return {"harness_ns": fast["harness"], **{k: fast[k] - fast["harness"] for k in targets},
            "median": {k: med[k] - med["harness"] for k in targets}}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# --- tables and destinations -----------------------------------------------------------------
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


# --- lookup loops ----------------------------------------------------------------------------
class LoopState(ctypes.Structure):
    _fields_ = [("from_", ctypes.c_uint64), ("done", ctypes.c_uint64), ("hits", ctypes.c_uint64)]


class LookupLoop:
    """fibbench.bpf.o bound to one data plane's maps: loops of independent
    lookups, one destination each, in one BPF_PROG_TEST_RUN. Their cache
    misses overlap, so they give a lookup's throughput, not what a packet
    pays (PacketBench does)."""

    def __init__(self, dp: Datapath, fib_mode: lo.FibMode, impl: lo.FibImpl, ifindex: int,
                 dests: dict[int, bytes], root4=None):
        """root4: IPv4's uncompressed 24-bit root (numpy uint32), for bench_dir24_4."""
        self.obj = BpfObject(FIBBENCH)
        try:
            if root4 is not None:
                self.obj.set_max_entries("bench_root4", len(root4) // lo.DIR_CHUNK)
            for name, m in dp.maps.items():
                try:
                    if self.obj.value_size(name) == m.info.value_size:  # (kernel-mode routers shrink the DIR maps)
                        self.obj.reuse_map(name, m.fd)
                except KeyError:
                    pass
            self.n = len(next(iter(dests.values()))) // (4 if 4 in dests else 16)
            self.obj.set_rodata("fib_mode", ctypes.c_uint32(fib_mode))
            self.obj.set_rodata("fib_impl", ctypes.c_uint32(impl))
            self.obj.set_rodata("bench_n", ctypes.c_uint32(self.n))
            self.obj.set_rodata("bench_ifindex", ctypes.c_uint32(ifindex))
            self.obj.load()
            for version, raw in dests.items():
                write_destinations(self.obj, version, raw)
            if root4 is not None:
                mm = self.obj.map("bench_root4", lo.u32, lo.DirChunk).mmap()
                np.frombuffer(mm, np.uint32)[:] = root4
                mm.close()
        except BaseException:
            self.obj.close()
            raise
        self.ifindex = ifindex
        self.frame = bytes(64)

    def ns(self, prog: str, expect_hits: bool = True) -> float:
        """One pass over every destination; ns per lookup. With expect_hits,
        every lookup must have found a route (a forwarding one for
        bpf_fib_lookup): a loop of misses would measure something else."""
        p = self.obj.program(prog)
        state = self.obj.map(".data.bench", lo.u32, LoopState)
        # a may_goto loop may stop at the kernel's time limit: go on from there
        total_ns = start = hits = 0
        while start < self.n:
            state.update(lo.u32(0), LoopState(start, 0, 0))
            total_ns += p.test_run(self.frame, ingress_ifindex=self.ifindex).duration_ns
            st = state.lookup(lo.u32(0))
            if st.done == 0:
                raise BenchError(f"{prog} made no progress at iteration {start} of {self.n}")
            start += st.done
            hits += st.hits
        if expect_hits and hits != self.n:
            raise BenchError(f"{prog}: {hits} of {self.n} lookups found a route")
        return total_ns / self.n

    def close(self) -> None:
        self.obj.close()
