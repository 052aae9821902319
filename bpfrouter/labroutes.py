"""Synthetic routing tables for the lab: random overlapping sets for
differential tests, and Internet-like tables for benchmarks."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numpy as np

from .routespec import IPNetwork

# IPv4 DFZ prefix-length mix (approximately the public table's shape).
V4_LENGTHS = {8: 0.0002, 12: 0.001, 13: 0.002, 14: 0.003, 15: 0.005, 16: 0.013, 17: 0.008, 18: 0.014,
              19: 0.025, 20: 0.040, 21: 0.046, 22: 0.110, 23: 0.100, 24: 0.6328}
# IPv6: blocks of RIRs, LIRs' allocations inside them, customers' more-specifics inside those.
V6_LENGTHS = {29: 0.04, 32: 0.12, 33: 0.01, 36: 0.05, 40: 0.07, 44: 0.08, 46: 0.02, 47: 0.03, 48: 0.58}


@dataclass(frozen=True)
class SynthRoute:
    prefix: IPNetwork
    type: str = "unicast"          # unicast, blackhole, unreachable, prohibit
    gateway: str | None = None

    def ip_batch_line(self, verb: str = "add") -> str:
        # `ip` takes the family from the prefix (a batch line cannot start with -6)
        if self.type == "unicast":
            return f"route {verb} {self.prefix} via {self.gateway}"
        return f"route {verb} {self.type} {self.prefix}"


def random_routes(rng: np.random.Generator, n: int, version: int, gateways: list[str],
                  typed: float = 0.15) -> list[SynthRoute]:
    """n distinct overlapping prefixes of every length (/0../32 or /0../128).

    Addresses share a random number of leading bits with one of a few anchors,
    so prefixes nest into each other at all depths."""
    width = 32 if version == 4 else 128
    anchors = [_rand_bits(rng, width, version) for _ in range(8)]
    seen: dict[IPNetwork, SynthRoute] = {}
    while len(seen) < n:
        length = int(rng.integers(0, width + 1))
        keep = int(rng.integers(0, length + 1))
        anchor = anchors[int(rng.integers(len(anchors)))]
        addr = (anchor & _mask(keep, width)) | (_rand_bits(rng, width, version) & ~_mask(keep, width))
        addr &= _mask(length, width)
        prefix = ipaddress.ip_network((addr, length)) if version == 4 else ipaddress.IPv6Network((addr, length))
        if version == 6 and (prefix.is_link_local or prefix.is_multicast) and length >= 8:
            continue
        r = rng.random()
        if r < typed:
            kind = ("blackhole", "unreachable", "prohibit")[int(rng.integers(3))]
            seen[prefix] = SynthRoute(prefix, kind)
        else:
            seen[prefix] = SynthRoute(prefix, "unicast", gateways[int(rng.integers(len(gateways)))])
    return list(seen.values())


def internet_routes4(rng: np.random.Generator, n: int) -> list[IPNetwork]:
    """n distinct IPv4 prefixes with the public table's length mix, outside martian space."""
    lengths = np.array(list(V4_LENGTHS))
    p = np.array(list(V4_LENGTHS.values()))
    out: set[tuple[int, int]] = set()
    while len(out) < n:
        k = (n - len(out)) * 11 // 10 + 16
        lens = rng.choice(lengths, size=k, p=p / p.sum())
        addrs = rng.integers(1 << 24, 224 << 24, size=k, dtype=np.int64)
        addrs &= ~((1 << (32 - lens)) - 1)
        for a, ln in zip(addrs.tolist(), lens.tolist(), strict=True):
            if (a >> 24) in (10, 127) or len(out) >= n:
                continue
            out.add((a, ln))
    return [ipaddress.IPv4Network(t) for t in out]


def internet_routes6(rng: np.random.Generator, n: int) -> list[IPNetwork]:
    """n distinct IPv6 prefixes shaped like the public table: clustered under
    a few thousand RIR blocks in 2000::/3, mostly /32 and /48."""
    blocks = [(0x2 << 125) | (int(rng.integers(0, 1 << 20)) << 105) for _ in range(max(16, n // 100))]
    lengths = np.array(list(V6_LENGTHS))
    p = np.array(list(V6_LENGTHS.values()))
    lirs = [b | (int(rng.integers(0, 1 << 9)) << 96) for b in blocks for _ in range(8)]
    out: set[tuple[int, int]] = set()
    while len(out) < n:
        ln = int(rng.choice(lengths, p=p / p.sum()))
        base = lirs[int(rng.integers(len(lirs)))]
        addr = base | (int(rng.integers(0, 1 << 16)) << 80)
        addr &= _mask(ln, 128)
        out.add((addr, ln))
    return [ipaddress.IPv6Network(t) for t in out]


def _mask(length: int, width: int) -> int:
    return ((1 << length) - 1) << (width - length) if length else 0


def _rand_bits(rng: np.random.Generator, width: int, version: int) -> int:
    value = int.from_bytes(rng.bytes(width // 8), "big")
    if version == 6:  # global unicast space, as the public table
        value = (value & ((1 << 125) - 1)) | (0x1 << 125)
    return value
