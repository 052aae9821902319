"""Differential check of the data plane against the kernel FIB: for sampled
destinations, does the loaded program choose what `ip route get` says?
Used by `bpfrouter verify`, the test suite and the FIB benchmark."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numpy as np
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .datapath import Datapath
from .datapath import layout as lo
from .observe import probe
from .routespec import IPAddress, IPNetwork

Reason = lo.Reason
KERNEL_ERRORS = {22: "blackhole", 113: "unreachable", 13: "prohibit", 101: "no_route"}
# The route is a forward (the probe's own fate aside: the kernel policy stage
# decides those after the route, on the probe's source and ingress, which an
# output lookup such as `ip route get DST` does not consider)
FORWARD_REASONS = {Reason.FWD_IPV4, Reason.FWD_IPV6, Reason.PASS_NO_NEIGH, Reason.PASS_FRAG_NEEDED,
                   Reason.PASS_TTL_EXCEEDED, Reason.PASS_EGRESS_UNMANAGED,
                   Reason.PASS_FORWARDING_OFF, Reason.PASS_HAIRPIN, Reason.PASS_LOCAL_SOURCE,
                   Reason.PASS_SOURCE_UNVERIFIED, Reason.DROP_MARTIAN_SOURCE, Reason.DROP_MARTIAN_DEST,
                   Reason.DROP_RPFILTER}
REASON_KIND = {Reason.PASS_LOCAL: "local", Reason.DROP_BLACKHOLE: "blackhole",
               Reason.PASS_UNREACHABLE: "unreachable", Reason.PASS_PROHIBIT: "prohibit",
               Reason.PASS_FIB_MISS: "no_route", Reason.PASS_MULTIPATH: "multipath"}


@dataclass(frozen=True)
class Answer:
    kind: str                    # forward, local, blackhole, unreachable, prohibit, no_route, ...
    oif: int = 0
    gateway: str | None = None

    def __str__(self) -> str:
        if self.kind != "forward":
            return self.kind
        return f"via {self.gateway} oif {self.oif}" if self.gateway else f"dev oif {self.oif}"


@dataclass
class Mismatch:
    dst: str
    kernel: Answer
    dataplane: Answer


def kernel_answer(ipr: IPRoute, dst: IPAddress) -> Answer:
    try:
        msg = ipr.route("get", dst=str(dst))[0]
    except NetlinkError as e:
        return Answer(KERNEL_ERRORS.get(e.code, f"error {e.code}"))
    if msg["type"] in (2, 3, 4):  # local, broadcast, anycast
        return Answer("local")
    return Answer("forward", msg.get_attr("RTA_OIF") or 0, msg.get_attr("RTA_GATEWAY"))


# passed because only the kernel can decide (encap, throw, rules): agrees by construction
KERNEL_DECIDES = {Reason.PASS_ENCAP, Reason.PASS_ROUTE_TYPE, Reason.PASS_POLICY}


def dataplane_answer(dp: Datapath, dst: IPAddress, iif: int, iif_mac: bytes) -> Answer:
    d = probe(dp, dst, iif, iif_mac)
    if d.reason in KERNEL_DECIDES:
        return Answer("kernel")
    if d.reason in FORWARD_REASONS:
        return Answer("forward", d.egress_ifindex, d.gateway)
    return Answer(REASON_KIND.get(d.reason, d.reason.label))


def is_routable(addr: IPAddress) -> bool:
    """Destinations the fast path routes at all (no martians, multicast, link-local)."""
    if addr.version == 4:
        return not (addr.is_multicast or addr.is_loopback or addr.is_unspecified or addr.is_reserved
                    or int(addr) >> 24 == 0)
    return not (addr.is_multicast or addr.is_link_local or addr.is_loopback or addr.is_unspecified)


def sample_destinations(rng: np.random.Generator, prefixes: list[IPNetwork], n: int,
                        version: int) -> list[IPAddress]:
    """Half inside random given prefixes (random host bits), half anywhere."""
    width = 32 if version == 4 else 128
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    out: list[IPAddress] = []
    while len(out) < n:
        raw = int.from_bytes(rng.bytes(width // 8), "big")
        if prefixes and rng.random() < 0.5:
            p = prefixes[int(rng.integers(len(prefixes)))]
            host = raw & ((1 << (width - p.prefixlen)) - 1)
            raw = int(p.network_address) | host
        addr = cls(raw)
        if is_routable(addr):
            out.append(addr)
    return out


def verify(dp: Datapath, dests: list[IPAddress], iif: int, iif_mac: bytes,
           ipr: IPRoute, progress=None) -> tuple[int, list[Mismatch]]:
    """Compare every destination; returns (how many compared, mismatches)."""
    bad = []
    for i, dst in enumerate(dests):
        if progress and not i % 256:
            progress(i)
        k = kernel_answer(ipr, dst)
        d = dataplane_answer(dp, dst, iif, iif_mac)
        if k != d and d.kind != "kernel":
            bad.append(Mismatch(str(dst), k, d))
    return len(dests), bad
