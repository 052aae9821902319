"""Redirect outcomes: the frames the router redirected that the egress port
took, and those it lost, per port and reason (bpf/include/xmit.h).

XDP_REDIRECT is decided after the router's program returns, so the program
counts a packet as forwarded before it is delivered. Three tp_btf programs
on the kernel's xdp tracepoints (xdp_devmap_xmit, xdp_redirect_err,
xdp_exception) count what became of it. They are loaded with the router,
share its `ifaces` map, and are pinned next to it (maps and links), so they
keep counting while no agent runs; `down` removes them with the pin
directory."""
from __future__ import annotations

import ctypes
import enum
import os
from pathlib import Path

from .bpf import BpfError, BpfObject, Btf, Link, Map, map_info, pin_object
from .datapath import Datapath, DatapathError
from .datapath import layout as lo
from .datapath.jiffies import JiffiesError, kernel_hz

PROGRAMS = ("xmit_devmap_xmit", "xmit_redirect_err", "xmit_exception")
COUNTERS = "xmit_counters"
EVENT_STATS = "xmit_event_stats"  # lost-redirect events: sent, suppressed (rate cap), lost (ring full)
EVENT_STAT_NAMES = ("sent", "suppressed", "lost")


class Outcome(enum.IntEnum):
    SENT = 0
    DROP_PEER_NOT_READY = enum.auto()
    DROP_RING_FULL = enum.auto()
    DROP_XMIT_ERROR = enum.auto()
    DROP_LINK_DOWN = enum.auto()
    DROP_TOO_BIG = enum.auto()
    DROP_NO_XDP_XMIT = enum.auto()
    DROP_ENQUEUE_ERROR = enum.auto()
    DROP_DEVMAP_MISS = enum.auto()

    @property
    def label(self) -> str:
        return self.name.removeprefix("DROP_").lower()


XMIT_MAX = len(Outcome)

OUTCOME_TEXT: dict[Outcome, str] = {
    Outcome.SENT: "taken by the egress port's driver (ndo_xdp_xmit)",
    Outcome.DROP_PEER_NOT_READY: "the veth peer stopped taking frames between enqueue and transmit "
                                 "(XDP or GRO turned off, or down: ENXIO)",
    Outcome.DROP_RING_FULL: "the egress driver took only part of a bulk: its ring was full "
                            "(or a frame exceeded the peer's MTU)",
    Outcome.DROP_XMIT_ERROR: "the egress driver refused the bulk with another error",
    Outcome.DROP_LINK_DOWN: "egress port not up (ENETDOWN)",
    Outcome.DROP_TOO_BIG: "frame over the egress MTU (EMSGSIZE)",
    Outcome.DROP_NO_XDP_XMIT: "the egress port does not take redirected frames (EOPNOTSUPP): a veth whose "
                              "peer has neither an XDP program nor GRO, or a driver without XDP transmit",
    Outcome.DROP_ENQUEUE_ERROR: "the devmap enqueue failed with another error",
    Outcome.DROP_DEVMAP_MISS: "egress port missing from tx_ports: the program aborted "
                              "(counted at the ingress port)",
}


def object_path(router_object: str) -> str:
    p = Path(router_object).with_name("xmit.bpf.o")
    if not p.exists():
        raise DatapathError(f"redirect outcome object {p} not found: run `make build`")
    return str(p)


def check_layout(path: str) -> None:
    with Btf(path) as btf:
        values = btf.enum("xmit_outcome")
        stats = btf.enum("xmit_event_stat")
    want = {"XMIT_" + o.name: o.value for o in Outcome} | {"XMIT_MAX": XMIT_MAX}
    want_stats = {f"XMIT_EVENTS_{n.upper()}": i for i, n in enumerate(EVENT_STAT_NAMES)}
    want_stats["XMIT_EVENT_STAT_MAX"] = len(EVENT_STAT_NAMES)
    if values != want or stats != want_stats:
        diff = (set(values.items()) ^ set(want.items())) | (set(stats.items()) ^ set(want_stats.items()))
        raise lo.LayoutMismatch(f"enums xmit_outcome/xmit_event_stat differ in {path}: {sorted(diff)[:4]}")


def attach(dp: Datapath, capture_prog_id: int = 0, events: bool = True) -> None:
    """Load the outcome counters against this router's maps, attach them to
    the tracepoints and pin maps and links under the router's pin directory.
    events: also put lost-redirect records into the router's event ring.
    Call from inside the router's network namespace (its inode is the filter)."""
    path = object_path(dp.object_path)
    check_layout(path)
    pin_dir = dp.pin_dir(dp.name)
    obj = BpfObject(path)
    try:
        obj.reuse_map("ifaces", dp.ifaces.fd)
        obj.reuse_map("tx_ports", dp.tx_ports.fd)
        obj.reuse_map("events", dp.maps["events"].fd)
        obj.set_rodata("xmit_events", ctypes.c_uint32(int(events)))
        try:
            obj.set_rodata("jiffies_hz", ctypes.c_uint32(kernel_hz()))
        except JiffiesError as e:
            raise DatapathError(f"{e} (the redirect outcome events' clock needs it)") from None
        obj.set_rodata("router_netns", ctypes.c_uint32(os.stat("/proc/self/ns/net").st_ino))
        obj.set_rodata("tx_ports_id", ctypes.c_uint32(map_info(dp.tx_ports.fd).id))
        obj.set_rodata("router_prog_id", ctypes.c_uint32(dp.program.id))
        obj.set_rodata("capture_prog_id", ctypes.c_uint32(capture_prog_id))
        try:
            obj.load()
        except BpfError as e:
            raise DatapathError(f"the kernel rejected the redirect outcome counters: {e}") from None
        try:
            for m in (COUNTERS, EVENT_STATS):
                pin_object(obj.map_fd(m), str(pin_dir / m))
            for name in PROGRAMS:
                link = Link.create_tracing(obj.program(name))
                try:
                    link.pin(str(pin_dir / f"tp_{name}"))
                finally:
                    link.close()
        except BpfError as e:
            raise DatapathError(f"cannot attach the redirect outcome counters: {e}") from None
    finally:
        obj.close()


def attached(dp: Datapath) -> bool:
    return (dp.pin_dir(dp.name) / COUNTERS).exists()


def read(dp: Datapath) -> dict[tuple[int, Outcome], int]:
    """(port ifindex, outcome) -> packets, summed over CPUs; empty when the
    router runs without the counters (started by an older version)."""
    path = dp.pin_dir(dp.name) / COUNTERS
    if not path.exists():
        return {}
    slot_to_ifindex = {v.slot: k.value for k, v in dp.ifaces.lookup_batch()}
    m = Map.pinned(str(path), ctypes.c_uint32, ctypes.c_uint64)
    try:
        out: dict[tuple[int, Outcome], int] = {}
        for k, per_cpu in m.lookup_batch():
            n = sum(c.value if hasattr(c, "value") else c for c in per_cpu)
            slot, outcome = divmod(k.value, XMIT_MAX)
            if n and outcome < XMIT_MAX and (slot == 0 or slot in slot_to_ifindex):
                out[(slot_to_ifindex.get(slot, 0), Outcome(outcome))] = n
        return out
    finally:
        m.close()


def event_stats(dp: Datapath) -> dict[str, int]:
    """Lost-redirect events sent, held back by the rate cap, lost to a full ring."""
    path = dp.pin_dir(dp.name) / EVENT_STATS
    if not path.exists():
        return dict.fromkeys(EVENT_STAT_NAMES, 0)
    m = Map.pinned(str(path), ctypes.c_uint32, ctypes.c_uint64)
    try:
        return {n: sum(v.value for v in m.lookup(ctypes.c_uint32(i))) for i, n in enumerate(EVENT_STAT_NAMES)}
    finally:
        m.close()
