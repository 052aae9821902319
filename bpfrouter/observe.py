"""Read the data plane back: counters per interface and reason, and probe
decisions (`route get`) made by the live program on a crafted packet."""
from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass

from .datapath import Datapath
from .datapath import layout as lo
from .fib import _nh_from_value
from .packet import mac_str, udp_probe

Reason = lo.Reason


def read_counters(dp: Datapath, ifindex: int | None = None) -> dict[tuple[int, Reason], tuple[int, int]]:
    """(ingress ifindex, reason) -> (packets, bytes), summed over CPUs.
    Ingress 0 stands for packets on an interface the router does not know.
    With `ifindex`, only that interface's counters are read."""
    slot_to_ifindex = {v.slot: k.value for k, v in dp.ifaces.lookup_batch()}
    if ifindex is None:
        entries = dp.counters.lookup_batch()
    else:
        slot = next((s for s, i in slot_to_ifindex.items() if i == ifindex), 0)
        keys = [lo.u32(slot * lo.REASON_MAX + r) for r in range(lo.REASON_MAX)]
        entries = [(k, dp.counters.lookup(k)) for k in keys]
    out: dict[tuple[int, Reason], tuple[int, int]] = {}
    for k, per_cpu in entries:
        pk = sum(c.packets for c in per_cpu)
        if not pk:
            continue
        slot, reason = divmod(k.value, lo.REASON_MAX)
        if reason >= lo.REASON_MAX or (slot and slot not in slot_to_ifindex):
            continue
        out[(slot_to_ifindex.get(slot, 0), Reason(reason))] = (pk, sum(c.bytes for c in per_cpu))
    return out


def clear_slot(dp: Datapath, slot: int) -> None:
    zero = [lo.Counter() for _ in range(dp.counters.ncpus)]
    stride = (ctypes.sizeof(lo.Counter) + 7) & ~7
    buf = (ctypes.c_uint8 * (stride * len(zero)))()
    for r in range(lo.REASON_MAX):
        dp.counters.update(lo.u32(slot * lo.REASON_MAX + r), buf)  # type: ignore[arg-type]


@dataclass
class Decision:
    dst: str
    iif: int
    reason: Reason
    action: str
    route_type: str | None = None
    prefix: str | None = None
    proto: str | None = None
    nh_id: int = 0
    gateway: str | None = None
    egress_ifindex: int = 0
    neigh_found: bool = False
    smac: str | None = None
    dmac: str | None = None
    ttl_in: int = 64
    ttl_out: int | None = None

    @property
    def verdict(self) -> str:
        return self.reason.verdict


XDP_ACTIONS = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}


def probe(dp: Datapath, dst, iif: int, iif_mac: bytes, src=None, ttl: int = 64) -> Decision:
    """Run a UDP probe to `dst`, arriving on `iif`, through the live program."""
    dst = ipaddress.ip_address(dst)
    if src is None:
        src = ipaddress.ip_address("192.0.2.1" if dst.version == 4 else "2001:db8::1")
    frame = udp_probe(src, dst, iif_mac, ttl=ttl)
    meta = lo.ProbeMeta(magic=lo.PROBE_MAGIC, reason=0xFFFFFFFF)
    res = dp.program.test_run(frame, ingress_ifindex=iif, meta=bytes(meta))
    out = lo.ProbeMeta.from_buffer_copy(res.meta.ljust(ctypes.sizeof(lo.ProbeMeta), b"\0"))
    d = Decision(str(dst), iif, Reason(out.reason), XDP_ACTIONS.get(res.retval, str(res.retval)),
                 ttl_in=ttl)
    if out.route_type:
        d.route_type = lo.RouteType(out.route_type).name.lower()
        if out.route_proto:  # BPF FIB mode: the matched entry is known
            d.prefix = str(ipaddress.ip_network(f"{dst}/{out.prefixlen}", strict=False))
            d.proto = lo.proto_name(out.route_proto)
    d.nh_id = out.nh_id
    if out.nh_id:
        v = dp.nexthops.lookup(lo.u32(out.nh_id))
        if v is not None and v.ifindex:
            gw = _nh_from_value(v).gateway
            d.gateway = str(gw) if gw else None
    d.egress_ifindex = out.egress_ifindex
    d.neigh_found = bool(out.flags & lo.PROBE_F_NEIGH)
    if d.verdict == "redirect" and len(res.data) >= 14:
        d.dmac, d.smac = mac_str(res.data[0:6]), mac_str(res.data[6:12])
        d.ttl_out = res.data[22] if dst.version == 4 else res.data[21]
    return d
