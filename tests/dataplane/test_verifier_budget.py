"""Every program of every object in build/ loads, in every configuration
the router, `make bench` and `make bench-fib` load it in, far from the
verifier's limits. The verifier's work for the same object differs between
hosts (a benchmark program that loaded here was refused with E2BIG on
another machine with the same kernel), so a program that merely passes here
is not enough: each must stay under half the 1M-instruction limit. A program
past it fails CI instead of a user."""
from __future__ import annotations

import ctypes
import itertools
import os

import pytest

from bpfrouter.bpf import BpfObject, prog_info
from bpfrouter.datapath import Datapath
from bpfrouter.datapath import layout as lo
from tests.conftest import ROOT

BUILD = ROOT / "build"
VERIFIER_LIMIT = 1_000_000  # instructions the verifier processes before it refuses (BPF_COMPLEXITY_LIMIT_INSNS)
BUDGET = VERIFIER_LIMIT // 2

# Every (FIB mode, structure) `bpfrouter up` accepts; the kernel FIB ignores the structure.
FIBS = [(lo.FibMode.BPF, lo.FibImpl.DIR), (lo.FibMode.BPF, lo.FibImpl.LPM), (lo.FibMode.KERNEL, lo.FibImpl.LPM)]
# Every set of observers `up --observers` accepts.
OBSERVER_SETS = [sum(c) for n in range(len(lo.OBSERVERS) + 1) for c in itertools.combinations(lo.OBSERVERS.values(), n)]


def router_loads():
    for (mode, impl), observe in itertools.product(FIBS, OBSERVER_SETS):
        yield pytest.param(mode, impl, observe, id=f"{mode.name.lower()}-{impl.name.lower()}-obs{observe}")


def verified(fd: int) -> int:
    return prog_info(fd).verified_insns


def within_budget(counts: dict[str, int]) -> None:
    over = {p: n for p, n in counts.items() if n > BUDGET}
    assert counts and not over, f"verified instructions over {BUDGET} (half the verifier's limit): {over}"


@pytest.mark.parametrize("mode,impl,observe", list(router_loads()))
def test_router_program_loads_within_budget(mode, impl, observe):
    """As `bpfrouter up` and the benchmarks load it (DIR FIB sized as bench-fib sizes it)."""
    name = f"vb{os.getpid() % 100000}"
    dp = Datapath.load(name, str(BUILD / "router.bpf.o"), mode, impl, groups=(65536, 32768), observe=observe)
    try:
        counts = {"bpfrouter_xdp": verified(dp.program.fd)}
        if observe & lo.OBS_F_CAPTURE:
            counts["bpfrouter_xdp_capture"] = verified(dp.capture_program().fd)
    finally:
        dp.destroy()
    within_budget(counts)


def load_all(obj_name: str, rodata: dict[str, ctypes._SimpleCData] | None = None) -> dict[str, int]:
    with BpfObject(str(BUILD / obj_name)) as obj:
        for var, value in (rodata or {}).items():
            obj.set_rodata(var, value)
        obj.load()
        return {name: verified(obj.program(name).fd) for name in obj.program_names()}


@pytest.mark.parametrize("mode,impl", FIBS, ids=[f"{m.name.lower()}-{i.name.lower()}" for m, i in FIBS])
def test_fib_lookup_loops_load_within_budget(mode, impl):
    """fibbench.bpf.o, as bench-fib loads it for each FIB."""
    within_budget(load_all("fibbench.bpf.o", {"fib_mode": ctypes.c_uint32(mode), "fib_impl": ctypes.c_uint32(impl),
                                              "bench_n": ctypes.c_uint32(1 << 20)}))


# object -> how its programs are loaded, beside router.bpf.o and fibbench.bpf.o above
OTHERS = {
    "pktbench.bpf.o": {"bench_n": ctypes.c_uint32(1 << 20)},
    "baseline.bpf.o": {"floor_ifindex": ctypes.c_uint32(1)},
    "selftest.bpf.o": {},
    "xmit.bpf.o": {},  # the redirect outcome counters (tracepoints), as `up` loads them but unattached
}


@pytest.mark.parametrize("obj_name", sorted(OTHERS))
def test_helper_objects_load_within_budget(obj_name):
    within_budget(load_all(obj_name, OTHERS[obj_name]))


def test_every_object_in_build_is_checked():
    """A new object must say here how it is loaded, or this fails."""
    built = {p.name for p in BUILD.glob("*.bpf.o")}
    assert built == {"router.bpf.o", "fibbench.bpf.o", *OTHERS}, f"objects without a load check: {built}"
