"""Load, pin, attach and re-open one router's data plane.

Everything lives under /sys/fs/bpf/bpfrouter/<name>/: the maps, the chain of
stages (its entry program, which `route get` runs packets through, the stage
programs and the program array joining them; stages.py), its twin with the
capture hook (entry bpfrouter_xdp_capture, stages and array prefixed
capture_, attached only while `bpfrouter capture` runs) and one XDP link per
interface. Pinned links keep forwarding when no process holds them, so
the control plane can stop, restart or upgrade at any time. Control-plane
metadata (object path, FIB mode, namespace) is kept next to it in
/run/bpfrouter/<name>/router.json."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..bpf import (BpfError, BpfObject, Link, Map, Program, XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE, pin_object,
                   prog_info, xdp_query)
from . import layout as lo
from .jiffies import JiffiesError
from .stages import STAGE_ARRAY, STAGES, Chain, ChainConfig, load_chain

PIN_ROOT = Path(os.environ.get("BPFROUTER_PIN_ROOT", "/sys/fs/bpf/bpfrouter"))
RUN_ROOT = Path(os.environ.get("BPFROUTER_RUN_ROOT", "/run/bpfrouter"))
PROGRAM = "bpfrouter_xdp"
CAPTURE_PROGRAM = "bpfrouter_xdp_capture"  # the entry of the chain with the capture hook
CAPTURE_PREFIX = "capture_"  # pins of that chain's stages and program array
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")

# map name -> (key layout, value layout)
MAPS: dict[str, tuple[type, type | None]] = {
    "ifaces": (ctypes.c_uint32, lo.Iface),
    "tx_ports": (ctypes.c_uint32, ctypes.c_uint32),
    "counters": (ctypes.c_uint32, lo.Counter),
    "neighbors": (lo.NeighKey, lo.Neigh),
    "fib4": (lo.Route4Key, lo.RouteValue),
    "fib6": (lo.Route6Key, lo.RouteValue),
    "nexthops": (ctypes.c_uint32, lo.NexthopValue),
    "nh_groups": (ctypes.c_uint32, lo.NhGroup),
    "nh_buckets": (ctypes.c_uint32, ctypes.c_uint32),
    "ecmp_hash": (ctypes.c_uint32, lo.EcmpHashConfig),
    "tables4": (lo.Table4Key, lo.RouteValue),
    "tables6": (lo.Table6Key, lo.RouteValue),
    "rule_active": (ctypes.c_uint32, ctypes.c_uint32),
    "rule_sets": (ctypes.c_uint32, lo.RuleSet),
    "rule_actions": (ctypes.c_uint32, lo.RuleAction),
    "rule_vectors": (ctypes.c_uint32, lo.RuleVector),
    "rule_prefixes": (lo.RulePrefixKey, ctypes.c_uint32),
    "rule_values": (lo.RuleU32Key, ctypes.c_uint32),
    "rule_bytes": (ctypes.c_uint32, ctypes.c_uint32),
    "rule_bounds": (ctypes.c_uint32, lo.RuleBound),
    "rule_hits": (ctypes.c_uint32, ctypes.c_uint64),
    "lb_services": (lo.LbServiceKey, lo.LbService),
    "lb_vips": (lo.LbVipKey, ctypes.c_uint32),
    "lb_backends": (ctypes.c_uint32, lo.LbBackend),
    "lb_ring": (ctypes.c_uint32, ctypes.c_uint32),
    "lb_conns": (lo.LbConnKey, lo.LbConn),
    "lb_nat": (lo.LbNatKey, lo.LbNat),
    "lb_config": (ctypes.c_uint32, lo.LbConfig),
    "lb_service_stats": (ctypes.c_uint32, lo.LbStat),
    "lb_backend_stats": (ctypes.c_uint32, lo.Counter),
    "dir4_top": (ctypes.c_uint32, lo.DirChunk),
    "dir4_blocks": (ctypes.c_uint32, None),  # bytes, as many as the loader made it
    "dir4_run_entries": (ctypes.c_uint32, ctypes.c_uint32 * lo.DIR_RUN_IDS),
    "dir4_groups": (ctypes.c_uint32, lo.DirGroup),
    "dir4_leaves": (ctypes.c_uint32, lo.DirLeaf4),
    "dir6_leaves": (ctypes.c_uint32, lo.DirLeaf6),
    "h6_buckets": (ctypes.c_uint32, lo.H6Bucket),
    "h6_leaf": (ctypes.c_uint32, lo.H6Leaves),
    "h6_filter": (ctypes.c_uint32, ctypes.c_uint64),
    "h6_conf": (ctypes.c_uint32, lo.H6Conf),
    "h6_active": (ctypes.c_uint32, ctypes.c_uint64),
    "dir4_root_leaf": (ctypes.c_uint32, lo.DirChunk),
    "dir4_group_leaf": (ctypes.c_uint32, lo.DirGroup),
    "obs_stats": (ctypes.c_uint32, ctypes.c_uint64),
    "events": (lo.Nothing, lo.Nothing),
    "event_windows": (ctypes.c_uint32, lo.EventWindow),
    "flows": (lo.FlowKey, lo.Flow),
    "flow_cache": (ctypes.c_uint32, lo.FlowSlot),
    "capture_cfg": (ctypes.c_uint32, lo.CaptureCfg),
    "capture_scratch": (ctypes.c_uint32, lo.CaptureRec),
    "capture_ring": (lo.Nothing, lo.Nothing),
}
DIR_MAPS = [m for m in MAPS if m.startswith(("dir", "h6_"))]  # the BPF FIB's default structure
# Maps the object names after a global's data section; pinned under the first name.
SECTION_MAPS = {"capture_cfg": ".data.capture"}


class DatapathError(Exception):
    """A user-facing, one-line problem with the data plane."""


def default_object() -> str:
    here = Path(__file__).resolve().parents[2]
    for cand in (os.environ.get("BPFROUTER_OBJECT"), here / "build" / "router.bpf.o"):
        if cand and Path(cand).exists():
            return str(cand)
    raise DatapathError("data plane object build/router.bpf.o not found: run `make build`")


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise DatapathError(f"invalid router name {name!r}: use up to 32 letters, digits, '_', '-', '.'")
    return name


def check_bpffs() -> None:
    if os.geteuid() != 0:
        raise DatapathError("bpfrouter needs root (CAP_BPF and CAP_NET_ADMIN): run it with sudo")
    with open("/proc/mounts") as f:
        if not any(line.split()[1] == "/sys/fs/bpf" and line.split()[2] == "bpf" for line in f):
            raise DatapathError("bpffs is not mounted at /sys/fs/bpf: run `mount -t bpf bpf /sys/fs/bpf`")


@dataclass
class RouterMeta:
    name: str
    object_path: str
    fib_mode: str
    netns: str | None
    xdp_mode: str
    interfaces: dict[str, int] = field(default_factory=dict)  # ifname -> ifindex
    fib_impl: str = "dir"
    metrics: str | None = None  # ADDR:PORT the agent serves Prometheus metrics on
    observers: list[str] = field(default_factory=lambda: list(lo.OBSERVERS))

    @staticmethod
    def path(name: str) -> Path:
        return RUN_ROOT / name / "router.json"

    def save(self) -> None:
        p = self.path(self.name)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(p)

    @classmethod
    def load(cls, name: str) -> "RouterMeta":
        try:
            return cls(**json.loads(cls.path(name).read_text()))
        except FileNotFoundError:
            raise DatapathError(f"no router named {name!r} is running (start one with `bpfrouter up`)") from None


def running_routers() -> list[str]:
    if not PIN_ROOT.is_dir():
        return []
    return sorted(p.name for p in PIN_ROOT.iterdir() if (p / PROGRAM).exists())


class Datapath:
    """Typed handles on one router's pinned program and maps."""

    def __init__(self, name: str, program: Program, maps: dict[str, Map], object_path: str):
        self.name = name
        self.program = program
        self.maps = maps
        self.object_path = object_path
        self._capture: Program | None = None  # opened on first use

    # typed accessors
    ifaces = property(lambda self: self.maps["ifaces"])
    tx_ports = property(lambda self: self.maps["tx_ports"])
    counters = property(lambda self: self.maps["counters"])
    neighbors = property(lambda self: self.maps["neighbors"])
    fib4 = property(lambda self: self.maps["fib4"])
    fib6 = property(lambda self: self.maps["fib6"])
    nexthops = property(lambda self: self.maps["nexthops"])
    nh_groups = property(lambda self: self.maps["nh_groups"])
    nh_buckets = property(lambda self: self.maps["nh_buckets"])
    ecmp_hash = property(lambda self: self.maps["ecmp_hash"])

    @staticmethod
    def pin_dir(name: str) -> Path:
        return PIN_ROOT / name

    @classmethod
    def load(cls, name: str, object_path: str, fib_mode: lo.FibMode,
             fib_impl: lo.FibImpl = lo.FibImpl.DIR, groups: tuple[int, int] | None = None,
             event_rate: int | None = None, observe: int | None = None) -> "Datapath":
        """Load and verify the chain of stages, pin it and its maps. All or nothing.

        groups: the DIR FIB's space in KiB: (IPv4 groups, 1 KiB each; IPv6 hash buckets).
        event_rate: events per second per reason and CPU (default 100).
        observe: OBS_F_* bits of the observers to compile in (default all).
        With the capture observer, a second chain, the same stages with the
        capture hook, is loaded on the same maps for `bpfrouter capture`."""
        check_bpffs()
        validate_name(name)
        pin_dir = cls.pin_dir(name)
        if (pin_dir / PROGRAM).exists():
            raise DatapathError(f"a router named {name!r} is already running: "
                                f"pick another --name or stop it with `bpfrouter down --name {name}`")
        lo.check_layouts(object_path)
        if observe is None:
            observe = sum(lo.OBSERVERS.values())
        if fib_mode == lo.FibMode.KERNEL:
            # the BPF FIB only mirrors here (`route show`, the kernel policy's
            # source lookups): the small LPM structure, DIR's maps left unsized
            fib_impl = lo.FibImpl.LPM
        cfg = ChainConfig(fib_mode, fib_impl, observe, False, event_rate)

        def size_maps(obj: BpfObject) -> None:
            if fib_mode == lo.FibMode.KERNEL or fib_impl != lo.FibImpl.DIR:
                for m in DIR_MAPS:  # unused: don't allocate their 64 MiB tables
                    if m == "dir4_blocks":  # one element, sized (its readers are dead code here)
                        obj.set_value_size(m, 8)
                    else:
                        obj.set_max_entries(m, 1)
            elif groups:
                obj.set_max_entries("dir4_groups", groups[0])
                obj.set_max_entries("dir4_group_leaf", groups[0])
                for m in ("h6_buckets", "h6_leaf", "h6_filter"):  # leaves and a filter word per bucket
                    obj.set_max_entries(m, groups[1] * 1024 // ctypes.sizeof(lo.H6Bucket))

        chains: list[Chain] = []
        try:
            try:
                chains.append(load_chain(object_path, cfg, prepare=size_maps))
                if observe & lo.OBS_F_CAPTURE:
                    first = chains[0].obj  # every map but its program array
                    shared = {m: first.map_fd(m) for m in [*first.map_names(), *SECTION_MAPS.values()]
                              if m != STAGE_ARRAY}
                    chains.append(load_chain(object_path, replace(cfg, capture=True), reuse=shared))
            except JiffiesError as e:
                raise DatapathError(f"{e} (the observers' clock needs it)") from None
            except BpfError as e:
                raise DatapathError(f"the kernel rejected the data plane: {e}") from None
            pin_dir.mkdir(parents=True, exist_ok=True)
            try:
                obj = chains[0].obj
                maps = {}
                for m, (kt, vt) in MAPS.items():
                    fd = os.dup(obj.map_fd(SECTION_MAPS.get(m, m)))
                    mp = Map(fd, kt, vt, m)
                    _pin(fd, pin_dir / m)
                    maps[m] = mp
                # Pinned: a program array that loses its last user reference is emptied.
                for chain, prefix in zip(chains, ("", CAPTURE_PREFIX)):
                    _pin(chain.obj.map_fd(STAGE_ARRAY), pin_dir / (prefix + STAGE_ARRAY))
                    for prog in chain.programs[1:]:
                        _pin(chain.obj.program(prog).fd, pin_dir / (prefix + prog))
                _pin(chains[0].entry.fd, pin_dir / PROGRAM)
                if len(chains) > 1:
                    _pin(chains[1].entry.fd, pin_dir / CAPTURE_PROGRAM)
                prog_fd = os.dup(chains[0].entry.fd)
            except Exception:
                shutil.rmtree(pin_dir, ignore_errors=True)
                raise
        finally:
            for chain in chains:
                chain.close()
        return cls(name, Program(prog_fd, PROGRAM, owns_fd=True), maps, object_path)

    @classmethod
    def open(cls, name: str, object_path: str | None = None) -> "Datapath":
        check_bpffs()
        pin_dir = cls.pin_dir(validate_name(name))
        if not (pin_dir / PROGRAM).exists():
            raise DatapathError(f"no router named {name!r} is running (start one with `bpfrouter up`)")
        if object_path:
            lo.check_layouts(object_path)
        prog = Program.pinned(str(pin_dir / PROGRAM))
        maps: dict[str, Map] = {}
        try:
            for m, (kt, vt) in MAPS.items():
                maps[m] = Map.pinned(str(pin_dir / m), kt, vt)
        except BpfError as e:
            prog.close()
            for mp in maps.values():
                mp.close()
            raise DatapathError(f"router {name!r} was loaded by another version of bpfrouter ({e}): "
                                f"`bpfrouter down --name {name}` and up again") from None
        return cls(name, prog, maps, object_path or "")

    @classmethod
    def remove(cls, name: str) -> None:
        """Detach and unpin a router, also one another version loaded (whose
        maps this one cannot open): its pins go, and with them its links."""
        try:
            dp = cls.open(name)
        except DatapathError:
            if not (cls.pin_dir(validate_name(name)) / PROGRAM).exists():
                raise
            shutil.rmtree(cls.pin_dir(name), ignore_errors=True)
            return
        dp.destroy()

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.program.close()
        if self._capture is not None:
            self._capture.close()

    # interfaces -----------------------------------------------------------
    def link_path(self, ifindex: int) -> Path:
        return self.pin_dir(self.name) / f"link_{ifindex}"

    def attach(self, ifindex: int, mode: str = "native") -> str:
        """Attach XDP as a pinned bpf_link; returns the mode in use."""
        if self.link_path(ifindex).exists():
            return xdp_query(ifindex)[0]
        attempts = {"native": [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE], "generic": [XDP_FLAGS_SKB_MODE]}[mode]
        last: BpfError | None = None
        for flags in attempts:
            try:
                link = Link.create_xdp(self.program, ifindex, flags)
                break
            except BpfError as e:
                last = e
                if e.errno == errno.EBUSY or e.errno == errno.EEXIST:
                    raise DatapathError(f"interface {ifindex} already has an XDP program attached "
                                        f"(see `ip link show`); detach it first") from None
        else:
            raise DatapathError(f"cannot attach XDP to interface {ifindex}: {last}")
        try:
            link.pin(str(self.link_path(ifindex)))
        finally:
            link.close()
        return xdp_query(ifindex)[0]

    def has_capture_program(self) -> bool:
        return (self.pin_dir(self.name) / CAPTURE_PROGRAM).exists()

    def capture_program(self) -> Program:
        """The program with the capture hook (owned here: closed with the data plane)."""
        if self._capture is None:
            if not self.has_capture_program():
                raise DatapathError(f"router {self.name!r} runs without the capture observer "
                                    f"(restart it with `bpfrouter up --observers` including capture)")
            self._capture = Program.pinned(str(self.pin_dir(self.name) / CAPTURE_PROGRAM))
        return self._capture

    def chain_programs(self, capture: bool = False) -> list[Program]:
        """The programs of the chain (the capture chain's with capture): its
        entry, then its configured stages, each opened from its pin; the
        caller closes them. In slot order, as the stage list gives it."""
        pin_dir = self.pin_dir(self.name)
        entry = CAPTURE_PROGRAM if capture else PROGRAM
        pinned = {p.name: p for p in pin_dir.glob((CAPTURE_PREFIX if capture else "") + "stage_*")}
        prefix = CAPTURE_PREFIX if capture else ""
        in_order = [pinned[n] for s in STAGES for n in (prefix + f"stage_{s.name}",
                                                         prefix + f"stage_{s.name}_capture") if n in pinned]
        return [Program.pinned(str(pin_dir / entry)), *(Program.pinned(str(p)) for p in in_order)]

    def _link(self, ifindex: int) -> Link | None:
        p = self.link_path(ifindex)
        return Link.pinned(str(p)) if p.exists() else None

    def set_capture_hook(self, ifindices: list[int], on: bool) -> None:
        """Swap these interfaces' links to the program with the capture hook
        (on) or back to the one without. Each swap is atomic; one that is
        already done is skipped (a swap costs the kernel ~10 ms on veth)."""
        prog = self.capture_program() if on else self.program
        want = prog.id
        for idx in ifindices:
            link = self._link(idx)
            if link is None:
                continue
            try:
                if link.info().prog_id != want:
                    link.update(prog)
            except BpfError as e:
                raise DatapathError(f"cannot swap the program on interface {idx}: {e}") from None
            finally:
                link.close()

    def program_stats(self) -> tuple[int, int]:
        """Runs and run time (ns) of both programs, the one with the capture
        hook included (the kernel counts them with kernel.bpf_stats_enabled=1)."""
        progs = [self.program] + ([self.capture_program()] if self.has_capture_program() else [])
        infos = [prog_info(p.fd) for p in progs]
        return sum(i.run_cnt for i in infos), sum(i.run_time_ns for i in infos)

    def capture_hooked(self) -> list[int]:
        """Interfaces whose link runs the program with the capture hook."""
        if not self.has_capture_program():
            return []
        hook_id = self.capture_program().id
        out = []
        for idx in self.linked():
            link = self._link(idx)
            if link is None:
                continue
            try:
                if link.info().prog_id == hook_id:
                    out.append(idx)
            finally:
                link.close()
        return out

    def detach(self, ifindex: int) -> None:
        p = self.link_path(ifindex)
        if not p.exists():
            return
        with contextlib.suppress(BpfError):
            link = Link.pinned(str(p))
            link.detach()
            link.close()
        p.unlink(missing_ok=True)

    def linked(self) -> list[int]:
        """The interfaces this router holds an XDP link on (from its pins, no netlink)."""
        return [int(p.name.split("_", 1)[1]) for p in self.pin_dir(self.name).glob("link_*")]

    def attached(self) -> dict[int, str]:
        """ifindex -> XDP mode, for the links this router holds."""
        out = {}
        for idx in self.linked():
            try:
                mode = xdp_query(idx)[0]
            except BpfError:
                mode = "gone"
            out[idx] = mode
        return out

    def destroy(self) -> None:
        for idx in self.linked():
            self.detach(idx)
        self.close()
        shutil.rmtree(self.pin_dir(self.name), ignore_errors=True)


def _pin(fd: int, path: Path) -> None:
    try:
        pin_object(fd, str(path))
    except BpfError as e:
        raise DatapathError(f"cannot pin {path}: {e}") from None
