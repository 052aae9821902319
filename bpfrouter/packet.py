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
              sport: int = 40000, dport: int = 33434, ttl: int = 64, payload: bytes = b"") -> bytes:
    """An Ethernet frame carrying UDP from src to dst (IPv4 or IPv6)."""
    src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    udp_len = 8 + len(payload)
    if dst.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, ttl, 17, 0,
                         src.packed, dst.packed)
        ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 17, udp_len)
        ethertype = 0x0800
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, udp_len, 17, ttl, src.packed, dst.packed)
        pseudo = src.packed + dst.packed + struct.pack("!IxxxB", udp_len, 17)
        ethertype = 0x86DD
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    csum = inet_checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    return dst_mac + src_mac + struct.pack("!H", ethertype) + ip + udp
