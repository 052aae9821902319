"""Build the small probe frames `route get` runs through the data plane.

Kept to a few struct calls: the CLI must answer fast, and a probe only
needs correct L2/L3/L4 headers and checksums."""
from __future__ import annotations

import ipaddress
import struct


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def udp_probe(src, dst, dst_mac: bytes, src_mac: bytes = b"\x02\0\0\0\0\x01",
              sport: int = 40000, dport: int = 33434, ttl: int = 64, payload: bytes = b"",
              proto: int = 17, tos: int = 0, flowlabel: int = 0) -> bytes:
    """An Ethernet frame carrying UDP (or, with proto 6, a TCP SYN) from src
    to dst (IPv4 or IPv6)."""
    src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0) + payload
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if dst.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(l4), 0, 0x4000, ttl, proto, 0,
                         src.packed, dst.packed)
        ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, proto, len(l4))
        ethertype = 0x0800
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28 | tos << 20 | flowlabel & 0xFFFFF, len(l4), proto, ttl,
                         src.packed, dst.packed)
        pseudo = src.packed + dst.packed + struct.pack("!IxxxB", len(l4), proto)
        ethertype = 0x86DD
    at = 16 if proto == 6 else 6  # the checksum's offset
    csum = inet_checksum(pseudo + l4) or (0xFFFF if proto == 17 else 0)
    l4 = l4[:at] + struct.pack("!H", csum) + l4[at + 2:]
    return dst_mac + src_mac + struct.pack("!H", ethertype) + ip + l4
