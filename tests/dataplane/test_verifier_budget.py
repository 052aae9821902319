"""Every program of every object in build/ loads, in every configuration
the router, `make bench` and `make bench-fib` load it in, far from the
verifier's limits. For the router that is every stage of both its chains
(the attached one and the capture chain), each verified on its own. The verifier's work for the same object differs between
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
from bpfrouter.datapath.stages import ChainConfig, StageSlot, entry_program, load_chain, slot_programs
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
def test_router_stages_load_within_budget(mode, impl, observe):
    """As `bpfrouter up` and the benchmarks load it (DIR FIB sized as bench-fib sizes it):
    every configured stage of each chain, and only those."""
    name = f"vb{os.getpid() % 100000}"
    dp = Datapath.load(name, str(BUILD / "router.bpf.o"), mode, impl, groups=(65536, 32768), observe=observe)
    counts = {}
    try:
        chains = [False] + ([True] if observe & lo.OBS_F_CAPTURE else [])
        for capture in chains:
            cfg = ChainConfig(mode, impl, observe, capture)
            progs = dp.chain_programs(capture)
            try:
                names = [prog_info(p.fd).name.decode() for p in progs]
                # the kernel keeps 15 characters of a program's name
                assert names == [n[:15] for n in [entry_program(cfg), *dict.fromkeys(p for p in slot_programs(cfg) if p)]]
                counts.update({f"{'capture ' if capture else ''}{n}": verified(p.fd) for n, p in zip(names, progs)})
            finally:
                for p in progs:
                    p.close()
    finally:
        dp.destroy()
    within_budget(counts)


def test_unconfigured_stage_is_not_in_the_chain():
    """Without observers the observe slot is empty (the deciding stages return
    their verdict); with them it holds stage_observe."""
    assert slot_programs(ChainConfig(lo.FibMode.BPF, observe=0))[StageSlot.OBSERVE] is None
    assert slot_programs(ChainConfig(lo.FibMode.BPF, observe=lo.OBS_F_CAPTURE))[StageSlot.OBSERVE] is None
    assert slot_programs(ChainConfig(lo.FibMode.BPF, observe=lo.OBS_F_CAPTURE, capture=True))[StageSlot.OBSERVE] \
        == "stage_observe_capture"
    assert slot_programs(ChainConfig(lo.FibMode.BPF, observe=lo.OBS_F_FLOWS))[StageSlot.OBSERVE] == "stage_observe"


@pytest.mark.parametrize("mode,impl", FIBS, ids=[f"{m.name.lower()}-{i.name.lower()}" for m, i in FIBS])
def test_single_program_build_loads_within_budget(mode, impl):
    """router_single.bpf.o, the same stages inlined into one program, as `make bench` loads it."""
    for capture in (False, True):
        cfg = ChainConfig(mode, impl, lo.OBS_F_EVENTS | lo.OBS_F_FLOWS, capture)
        with load_chain(str(BUILD / "router_single.bpf.o"), cfg, prepare=shrink_dir_maps) as chain:
            within_budget({n: v["verified_insns"] for n, v in chain.budget().items()})


def shrink_dir_maps(obj: BpfObject) -> None:
    for m in ("dir4_groups", "dir4_group_leaf", "h6_buckets", "h6_leaf", "h6_filter"):
        obj.set_max_entries(m, 1024)


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
    "decap.bpf.o": {},  # a backend's decapsulation (`bpfrouter decap attach`)
}


@pytest.mark.parametrize("obj_name", sorted(OTHERS))
def test_helper_objects_load_within_budget(obj_name):
    within_budget(load_all(obj_name, OTHERS[obj_name]))


def test_every_object_in_build_is_checked():
    """A new object must say here how it is loaded, or this fails."""
    built = {p.name for p in BUILD.glob("*.bpf.o")}
    assert built == {"router.bpf.o", "router_single.bpf.o", "fibbench.bpf.o", *OTHERS}, f"objects without a load check: {built}"
