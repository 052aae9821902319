"""Helpers shared by the benchmarks."""
from __future__ import annotations

import ctypes
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BENCH = str(ROOT / "build" / "fibbench.bpf.o")
sys.path.insert(0, str(ROOT))

from bpfrouter.bpf import BpfObject  # noqa: E402
from bpfrouter.datapath import Datapath  # noqa: E402
from bpfrouter.datapath import layout as lo  # noqa: E402
from bpfrouter.datapath.jiffies import kernel_hz  # noqa: E402


def bpfrouter(*args: str, netns_name: str | None = None) -> str:
    """Run the real `bpfrouter` command, as a user would."""
    argv = [sys.executable, "-m", "bpfrouter"] + (["--netns", netns_name] if netns_name else []) + list(args)
    return subprocess.run(argv, check=True, capture_output=True, text=True, cwd=ROOT).stdout


def start_lab_router(lab, name: str) -> None:
    bpfrouter("up", "r-eth0", "r-eth1", "--name", name, netns_name=lab.router_ns)


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(result, indent=1))
    return path


class BenchState(ctypes.Structure):
    _fields_ = [("from_", ctypes.c_uint64), ("done", ctypes.c_uint64)]


class Bench:
    """fibbench.bpf.o bound to one data plane's maps."""

    def __init__(self, dp: Datapath, fib_mode: lo.FibMode, impl: lo.FibImpl, n: int, ifindex: int,
                 eth: bytes, dests: dict[int, bytes], observe: int | None = None, frame: bytes | None = None,
                 mem_bytes: int = 0, root4=None):
        """root4: IPv4's uncompressed 24-bit root (numpy uint32), for bench_dir24_4."""
        self.obj = BpfObject(BENCH)
        if root4 is not None:
            self.obj.set_max_entries("bench_root4", len(root4) // lo.DIR_CHUNK)
        if mem_bytes:  # bench_mem4: random reads over this many bytes (8 per array element)
            self.obj.set_max_entries("bench_mem", mem_bytes // 8)
            self.obj.set_rodata("bench_mem_mask", ctypes.c_uint32(mem_bytes // 8 - 1))
        for name, m in dp.maps.items():
            try:
                if self.obj.value_size(name) == m.info.value_size:  # (a router without the DIR FIB shrank its blocks)
                    self.obj.reuse_map(name, m.fd)
            except KeyError:
                pass
        self.obj.set_rodata("fib_mode", ctypes.c_uint32(fib_mode))
        self.obj.set_rodata("fib_impl", ctypes.c_uint32(impl))
        self.obj.set_rodata("bench_n", ctypes.c_uint32(n))
        self.obj.set_rodata("jiffies_hz", ctypes.c_uint32(kernel_hz()))
        self.obj.set_rodata("bench_ifindex", ctypes.c_uint32(ifindex))
        if observe is not None:
            self.obj.set_rodata("observe_flags", ctypes.c_uint32(observe))
        self.obj.load()
        self.ifindex = ifindex
        for version, raw in dests.items():
            if version == 4:  # array elements are 8-byte aligned: struct dst4 { addr; pad; }
                raw = np.frombuffer(raw, np.uint32).astype(np.uint64).tobytes()
            m = self.obj.map(f"bench_dst{version}", ctypes.c_uint32, ctypes.c_uint8 * (8 if version == 4 else 16))
            mm = m.mmap()
            mm[: len(raw)] = raw
            mm.close()
        if root4 is not None:
            mm = self.obj.map("bench_root4", ctypes.c_uint32, lo.DirChunk).mmap()
            np.frombuffer(mm, np.uint32)[:] = root4
            mm.close()
        self.obj.map("bench_eth", ctypes.c_uint32, ctypes.c_uint8 * 14).update(
            ctypes.c_uint32(0), (ctypes.c_uint8 * 14)(*eth))
        self.frame = frame or eth + bytes.fromhex("450000200000400040110000") + bytes([10, 255, 0, 2]) + \
            bytes(4) + bytes.fromhex("9c40829a000c0000") + bytes(4)
        self.n = n

    def _runs(self, prog: str, runs: int) -> list[float]:
        p = self.obj.program(prog)
        state = self.obj.map(".data.bench", ctypes.c_uint32, BenchState)
        out = []
        for _ in range(runs):
            # a may_goto loop may stop at the kernel's time limit: go on from there
            total_ns = start = 0
            while start < self.n:
                state.update(ctypes.c_uint32(0), BenchState(start, 0))
                total_ns += p.test_run(self.frame, ingress_ifindex=self.ifindex).duration_ns
                done = state.lookup(ctypes.c_uint32(0)).done
                if done == 0:
                    raise SystemExit(f"bench wrong: {prog} made no progress at iteration {start} of {self.n}")
                start += done
            out.append(total_ns / self.n)
        return out

    def ns(self, prog: str, rounds: int) -> float:
        return statistics.median(self._runs(prog, rounds))

    def best_ns(self, prog: str, runs: int) -> float:
        """The fastest of several runs: interference only ever adds time."""
        return min(self._runs(prog, runs))

    def close(self) -> None:
        self.obj.close()
