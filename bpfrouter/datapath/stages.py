"""The data plane's chain of stages: which are configured, loading them, and
filling the program array that joins them (bpf/include/pipeline.h).

The attached program is the entry stage. Each later stage is a program of
its own in router.bpf.o, reached by a tail call with a constant index into
the `stages` program array; each slot holds the first configured stage at or
after it, so a stage that is not configured is neither loaded nor on any
packet's path. The same object built as one program (router_single.bpf.o)
has no array: its chain is its entry alone."""
from __future__ import annotations

import ctypes
import enum
import re
from dataclasses import dataclass, field
from typing import Callable

from ..bpf import BpfObject, Btf, Program, prog_info
from . import layout as lo
from .jiffies import kernel_hz

ENTRY_PROGRAM = "bpfrouter_xdp"
CAPTURE_SUFFIX = "_capture"  # the capture chain's entry and observe stage: they hold the capture hook
STAGE_ARRAY = "stages"


@dataclass(frozen=True)
class ChainConfig:
    """What a chain is loaded for; the stages' rodata follows from it."""
    fib_mode: lo.FibMode
    fib_impl: lo.FibImpl = lo.FibImpl.DIR
    observe: int = lo.OBS_F_EVENTS | lo.OBS_F_FLOWS | lo.OBS_F_CAPTURE
    capture: bool = False       # the chain `bpfrouter capture` swaps in
    event_rate: int | None = None


@dataclass(frozen=True)
class Stage:
    name: str                   # bpf/stages/<name>.h, program stage_<name>, slot STAGE_<NAME>
    configured: Callable[[ChainConfig], bool]
    capture_variant: bool = False  # stage_<name>_capture in the capture chain

    def program(self, cfg: ChainConfig) -> str:
        return f"stage_{self.name}" + (CAPTURE_SUFFIX if cfg.capture and self.capture_variant else "")


def entry_program(cfg: ChainConfig) -> str:
    return ENTRY_PROGRAM + (CAPTURE_SUFFIX if cfg.capture else "")


def _observers(cfg: ChainConfig) -> bool:
    return cfg.capture or bool(cfg.observe & (lo.OBS_F_EVENTS | lo.OBS_F_FLOWS))


# The stage list after entry, in slot order: bpf/stages/list.h's DECISION_STAGES, then observe.
STAGES: tuple[Stage, ...] = (
    Stage("lb", lambda cfg: True),
    Stage("policy", lambda cfg: cfg.fib_mode == lo.FibMode.BPF),
    Stage("fib", lambda cfg: True),
    Stage("ecmp", lambda cfg: cfg.fib_mode == lo.FibMode.BPF),
    Stage("kernel_policy", lambda cfg: True),
    Stage("forward", lambda cfg: True),
    Stage("observe", _observers, capture_variant=True),
)
StageSlot = enum.IntEnum("StageSlot", {"ENTRY": 0, **{s.name.upper(): i + 1 for i, s in enumerate(STAGES)}})


def check_stage_list(object_path: str) -> None:
    """The object's enum stage must be this list, slot for slot."""
    with Btf(object_path) as btf:
        values = btf.enum("stage")
    want = {f"STAGE_{m.name}": m.value for m in StageSlot} | {"STAGE_MAX": len(StageSlot)}
    if values != want:
        raise lo.LayoutMismatch(f"stage list of {object_path} differs from bpfrouter/datapath/stages.py: "
                                f"{sorted(set(values.items()) ^ set(want.items()))[:4]}")


def slot_programs(cfg: ChainConfig) -> list[str | None]:
    """Slot -> the program that fills it (slot 0, the entry, is attached, not in the array)."""
    out: list[str | None] = [None] * len(StageSlot)
    nxt = None
    for slot in range(len(StageSlot) - 1, 0, -1):
        stage = STAGES[slot - 1]
        if stage.configured(cfg):
            nxt = stage.program(cfg)
        out[slot] = nxt
    return out


_STACK = re.compile(r"^stack depth ([\d+]+)", re.M)


@dataclass
class Chain:
    """A loaded chain: its object (owning every fd) and its programs."""
    obj: BpfObject
    cfg: ChainConfig
    programs: list[str]         # entry first, then the configured stages in slot order
    staged: bool
    stats_kept: bool = False
    slots: list[str | None] = field(default_factory=list)

    @property
    def entry(self) -> Program:
        return self.obj.program(self.programs[0])

    def budget(self) -> dict[str, dict]:
        """Per program: instructions the verifier processed (bpf_prog_info),
        and, with stats kept, the stack depth of each function (BPF_LOG_STATS)."""
        out = {}
        for name in self.programs:
            row: dict = {"verified_insns": prog_info(self.obj.program(name).fd).verified_insns}
            if self.stats_kept:
                m = _STACK.search(self.obj.verifier_stats(name))
                frames = [int(x) for x in m.group(1).split("+")] if m else []
                row["stack_frames"] = frames
                row["stack_depth"] = sum(frames) if frames else None
            out[name] = row
        return out

    def close(self) -> None:
        self.obj.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_chain(object_path: str, cfg: ChainConfig, reuse: dict[str, int] | None = None,
               prepare: Callable[[BpfObject], None] | None = None, keep_stats: bool = False) -> Chain:
    """Load the entry and the configured stages of `object_path` with cfg's
    rodata, on the maps in `reuse` (object map name -> fd) where given, and
    fill its program array. prepare(obj) runs before load (map sizes).
    Raises BpfError when the kernel refuses a program."""
    obj = BpfObject(object_path)
    try:
        staged = STAGE_ARRAY in obj.map_names()
        if staged:
            check_stage_list(object_path)
        slots = slot_programs(cfg) if staged else []
        stage_progs = [p for p in dict.fromkeys(slots) if p]
        programs = [entry_program(cfg), *stage_progs]
        obj.only_programs(*programs)
        obj.set_rodata("fib_mode", ctypes.c_uint32(cfg.fib_mode))
        obj.set_rodata("fib_impl", ctypes.c_uint32(cfg.fib_impl))
        obj.set_rodata("jiffies_hz", ctypes.c_uint32(kernel_hz()))
        obj.set_rodata("observe_flags", ctypes.c_uint32(cfg.observe))
        if staged:
            obj.set_rodata("observe_in_chain", ctypes.c_uint32(slots[StageSlot.OBSERVE] is not None))
        if cfg.event_rate is not None:
            obj.set_rodata("event_rate", ctypes.c_uint32(cfg.event_rate))
        for name, fd in (reuse or {}).items():
            obj.reuse_map(name, fd)
        if prepare:
            prepare(obj)
        if keep_stats:
            obj.keep_verifier_stats()
        obj.load()
        if staged:
            array = obj.map(STAGE_ARRAY, lo.u32, lo.u32)
            for slot, prog in enumerate(slots):
                if prog:
                    array.update(lo.u32(slot), lo.u32(obj.program(prog).fd))
    except BaseException:
        obj.close()
        raise
    return Chain(obj, cfg, programs, staged, keep_stats, slots)


__all__ = ["Chain", "ChainConfig", "Stage", "STAGES", "StageSlot", "ENTRY_PROGRAM", "STAGE_ARRAY", "load_chain",
           "slot_programs", "check_stage_list", "entry_program"]
