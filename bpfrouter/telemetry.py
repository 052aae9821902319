"""Read what the data plane's observers recorded: events from the ring
buffer, the flow table, their own counters, and how full every map is."""
from __future__ import annotations

import ctypes
import ipaddress
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from .bpf import RingBuffer
from .datapath import Datapath
from .datapath import jiffies
from .datapath import layout as lo
from .interfaces import ifname
from .observe import XDP_ACTIONS
from .packet import mac_str
from .xmit import Outcome

L4_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6"}
TCP_FLAGS = "FSRPAUEC"  # bit 0 (FIN) first, as tcpdump's letters


def tcp_flags_str(bits: int) -> str:
    return "".join(c for i, c in enumerate(TCP_FLAGS) if bits & (1 << i))


def monotonic_to_wall(ns: int) -> float:
    """bpf_ktime_get_ns() (CLOCK_MONOTONIC) as Unix time."""
    return time.time() - (time.monotonic_ns() - ns) / 1e9


def _addr(raw, family: int) -> str | None:
    if family == 4:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    if family == 6:
        return str(ipaddress.IPv6Address(bytes(raw)))
    return None


def obs_stats(dp: Datapath) -> dict[str, int]:
    """The observers' own counters, summed over CPUs (names: ObsStat, lower case)."""
    return {s.name.lower(): sum(v.value for v in dp.maps["obs_stats"].lookup(lo.u32(s))) for s in lo.ObsStat}


# --- events ---------------------------------------------------------------------------
def decode_event(raw: bytes) -> dict:
    e = lo.Event.from_buffer_copy(raw[:ctypes.sizeof(lo.Event)])
    reason = lo.Reason(e.reason) if e.reason < lo.REASON_MAX else None
    out = {
        "time": round(monotonic_to_wall(e.ts_ns), 6),
        "iface": ifname(e.ifindex), "reason": reason.label if reason else str(e.reason),
        "verdict": reason.verdict if reason else "unknown", "xdp_action": XDP_ACTIONS.get(e.action, str(e.action)),
        "len": e.len, "vlan": e.vlan_id if e.vlan_depth else None,
        "src_mac": mac_str(bytes(e.src_mac)), "dst_mac": mac_str(bytes(e.dst_mac)),
        "ethertype": f"0x{e.l3_proto:04x}", "family": e.family or None,
        "src": _addr(e.saddr, e.family), "dst": _addr(e.daddr, e.family),
        "proto": L4_NAMES.get(e.l4_proto, e.l4_proto) if e.family else None,
        "sport": e.sport if e.l4_proto in (6, 17) else None, "dport": e.dport if e.l4_proto in (6, 17) else None,
        "ttl": e.ttl if e.family else None, "tcp_flags": tcp_flags_str(e.tcp_flags) if e.l4_proto == 6 else None,
        "route": None, "nexthop_id": e.nh_id or None,
        "egress": ifname(e.egress_ifindex) if e.egress_ifindex else None,
    }
    if e.xmit_outcome:  # a redirect the egress did not deliver (bpf/xmit.bpf.c): `len` frames, no headers
        out.update({"verdict": "redirect_lost", "reason": Outcome(e.xmit_outcome).label
                    if e.xmit_outcome < len(Outcome) else str(e.xmit_outcome),
                    "src_mac": None, "dst_mac": None, "ethertype": None, "frames": e.len})
        return out
    if e.l4_proto in (1, 58) and e.family:
        out["icmp_type"], out["icmp_code"] = e.sport >> 8, e.sport & 0xFF
    if e.route_type:
        route = {"type": lo.RouteType(e.route_type).name.lower()}
        if e.route_proto and out["dst"]:
            route["prefix"] = str(ipaddress.ip_network(f"{out['dst']}/{e.prefixlen}", strict=False))
            route["proto"] = lo.proto_name(e.route_proto)
        out["route"] = route
    return out


def clock(t: float) -> str:
    """Unix time as tcpdump prints it: HH:MM:SS.microseconds, local time."""
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1e6) % 1000000:06d}"


def event_line(ev: dict) -> str:
    """One event the way tcpdump users read packets."""
    head = f"{clock(ev['time'])} {ev['iface']} {ev['verdict']} {ev['reason']}"
    if ev["vlan"] is not None:
        head += f" vlan {ev['vlan']}"
    if ev["src"]:
        ports = ev["sport"] is not None
        src = f"{ev['src']}.{ev['sport']}" if ports else ev["src"]
        dst = f"{ev['dst']}.{ev['dport']}" if ports else ev["dst"]
        body = f"{ev['proto']} {src} > {dst} ttl {ev['ttl']}"
        if ev.get("tcp_flags"):
            body += f" [{ev['tcp_flags']}]"
        if "icmp_type" in ev:
            body += f" type {ev['icmp_type']} code {ev['icmp_code']}"
    elif "frames" in ev:
        return f"{head}: {ev['frames']} frame(s) lost after redirect" + \
            (f" to {ev['egress']}" if ev["egress"] else "")
    else:
        body = f"{ev['src_mac']} > {ev['dst_mac']} ethertype {ev['ethertype']}"
    tail = f" len {ev['len']}"
    if ev["route"]:
        tail += f" route {ev['route'].get('prefix') or ev['route']['type']}"
    if ev["egress"]:
        tail += f" egress {ev['egress']}"
    return f"{head}: {body}{tail}"


class EventStream:
    """Consumes the events ring buffer. A ring buffer has one consumer
    position: two readers at once would each see part of the events."""

    def __init__(self, dp: Datapath, callback: Callable[[bytes], None]):
        self.rb = RingBuffer(dp.maps["events"].fd, callback)

    def poll(self, timeout_ms: int = 200) -> int:
        return self.rb.poll(timeout_ms)

    def close(self) -> None:
        self.rb.close()


# --- flows ----------------------------------------------------------------------------
@dataclass
class FlowRecord:
    key: tuple
    iface: int
    egress: int
    family: int
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    vlan: int
    packets: int
    bytes: int
    first_ns: int
    last_ns: int
    tcp_flags: int
    reason: lo.Reason
    action: int

    def as_json(self) -> dict:
        ports = self.proto in (6, 17)
        return {
            "src": self.src, "dst": self.dst, "proto": L4_NAMES.get(self.proto, self.proto),
            "sport": self.sport if ports else None, "dport": self.dport if ports else None,
            "vlan": self.vlan or None, "iface": ifname(self.iface),
            "egress": ifname(self.egress) if self.egress else None,
            "packets": self.packets, "bytes": self.bytes,
            "first_seen": round(monotonic_to_wall(self.first_ns), 3),
            "last_seen": round(monotonic_to_wall(self.last_ns), 3),
            "tcp_flags": tcp_flags_str(self.tcp_flags) if self.proto == 6 else None,
            "verdict": self.reason.verdict, "reason": self.reason.label,
            "xdp_action": XDP_ACTIONS.get(self.action, str(self.action)),
            **({"icmp_type": self.sport >> 8, "icmp_code": self.sport & 0xFF, "icmp_id": self.dport}
               if self.proto in (1, 58) else {}),
        }


def _flow_parts(dp: Datapath) -> dict[bytes, tuple[lo.FlowKey, list[lo.Flow]]]:
    """Every flow's per-CPU values: the table's, and the deltas the per-CPU
    cache holds that the table has not received yet."""
    parts: dict[bytes, tuple[lo.FlowKey, list[lo.Flow]]] = {}

    def add(k: lo.FlowKey, v: lo.Flow) -> None:
        parts.setdefault(bytes(k), (k, []))[1].append(v)

    for k, per_cpu in dp.maps["flows"].lookup_batch():
        for v in per_cpu:
            if v.packets or v.first_jiffies:
                add(k, v)
    for _, per_cpu in dp.maps["flow_cache"].lookup_batch():
        for slot in per_cpu:
            if slot.delta.packets:
                add(slot.key, slot.delta)
    return parts


def read_flows(dp: Datapath) -> list[FlowRecord]:
    """Every flow, its parts merged: sums for counts, first and last seen
    across CPUs and the cache, the last packet's verdict."""
    clock = jiffies.now()
    out = []
    for k, parts in _flow_parts(dp).values():
        seen = [v for v in parts if v.packets]
        if not seen:
            continue
        last = max(reversed(seen), key=lambda v: v.last_jiffies)  # ties: the cache, newer
        flags = 0
        for v in seen:
            flags |= v.tcp_flags
        first = min(v.first_jiffies for v in parts if v.first_jiffies)
        out.append(FlowRecord(
            key=(bytes(k.saddr), bytes(k.daddr), k.sport, k.dport, k.vlan_id, k.l4_proto, k.family),
            iface=last.ifindex, egress=last.egress_ifindex, family=k.family, proto=k.l4_proto,
            src=_addr(k.saddr, k.family) or "", dst=_addr(k.daddr, k.family) or "", sport=k.sport, dport=k.dport,
            vlan=k.vlan_id, packets=sum(v.packets for v in seen), bytes=sum(v.bytes for v in seen),
            first_ns=clock.monotonic(first), last_ns=clock.monotonic(last.last_jiffies), tcp_flags=flags,
            reason=lo.Reason(last.reason) if last.reason < lo.REASON_MAX else lo.Reason.PASS_NON_IP,
            action=last.action))
    return out


def flow_table_stats(dp: Datapath, entries: int | None = None, stats: dict[str, int] | None = None) -> dict[str, int]:
    """Size, entries and evictions (flows created minus flows present).
    entries, stats: the flow count and obs_stats() when the caller has them."""
    if entries is None:
        entries = dp.maps["flows"].count()
    created = (stats or obs_stats(dp))["flows_created"]
    return {"capacity": dp.maps["flows"].max_entries, "entries": entries,
            "created": created, "evicted": max(0, created - entries)}


# --- map fill ---------------------------------------------------------------------------
FILL_WARNING = 0.9


def map_fill(dp: Datapath, fib_sizes: dict[int, dict] | None = None) -> dict[str, dict[str, int]]:
    """Entries and capacity of every map that fills up. fib_sizes: each FIB
    table's own accounting (its memory() by IP version)."""
    out: dict[str, dict[str, int]] = {}
    for name in ("ifaces", "neighbors", "nexthops", "flows"):
        m = dp.maps[name]
        if name == "nexthops":  # an array: an entry is used when it names an interface
            used = sum(1 for _, v in m.lookup_batch() if v.ifindex)
        else:
            used = m.count()
        out[name] = {"entries": used, "capacity": m.max_entries}
    for family, sizes in (fib_sizes or {}).items():
        out[f"fib{family}"] = {"entries": sizes["routes"], "capacity": sizes["routes_total"]}
        for part in ("groups", "slots"):  # the DIR FIB's IPv4 groups, IPv6's hash slots
            if f"{part}_used" in sizes:
                out[f"fib{family}_{part}"] = {"entries": sizes[f"{part}_used"], "capacity": sizes[f"{part}_total"]}
    return out


def fill_warnings(fill: dict[str, dict[str, int]]) -> list[str]:
    """One line per map at or above FILL_WARNING of its capacity. The flow
    table is an LRU: full is its normal state, so it is left out."""
    return [f"map {name} is {v['entries'] / v['capacity']:.0%} full ({v['entries']} of {v['capacity']})"
            for name, v in fill.items()
            if name != "flows" and v["capacity"] and v["entries"] / v["capacity"] >= FILL_WARNING]


def iter_flows_sorted(flows: list[FlowRecord], key: str) -> Iterator[FlowRecord]:
    keyf = {"packets": lambda f: f.packets, "bytes": lambda f: f.bytes, "last": lambda f: f.last_ns,
            "first": lambda f: f.first_ns}[key]
    return iter(sorted(flows, key=keyf, reverse=True))
