"""The backend's decapsulation (bpf/decap.bpf.c): attach, detach, count.

Run in the backend's network namespace. The XDP link and the counters are
pinned under /sys/fs/bpf/bpfrouter/decap/<netns inode>-<ifindex>, so the
attachment outlives the command, and `show`/`detach` find it again."""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import shutil
import socket
from pathlib import Path

from ..bpf import BpfError, BpfObject, Link, Map, XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE, pin_object
from ..datapath.datapath import PIN_ROOT, check_bpffs, default_object as router_object
from ..datapath import layout as lo
from .service import GUE_PORT

DECAP_STATS = ("v4_in_v4", "v6_in_v4", "v4_in_v6", "v6_in_v6", "failed", "foreign", "gue")
# the load balancer's default outer sources (lb/image.py's DEFAULT_SRC4/6)
DEFAULT_FROM = ("172.16.0.0/16", "100::/96")
PROGRAM = "bpfrouter_decap"


class DecapError(Exception):
    pass


def default_object() -> str:
    return str(Path(router_object()).with_name("decap.bpf.o"))


def _ifindex(dev: str) -> int:
    try:
        return socket.if_nametoindex(dev)
    except OSError:
        raise DecapError(f"no interface {dev!r} in this network namespace") from None


def pin_dir(dev: str) -> Path:
    return PIN_ROOT / "decap" / f"{os.stat('/proc/self/ns/net').st_ino}-{_ifindex(dev)}"


def _drop_stale(d: Path, ifindex: int) -> None:
    """Pins left by a device, or a namespace, that is gone (the kernel
    detached its link; a new namespace may reuse the inode number)."""
    if not (d / "link").exists():
        return
    try:
        link = Link.pinned(str(d / "link"))
        try:
            alive = link.info().ifindex == ifindex
        finally:
            link.close()
    except BpfError:
        alive = False
    if not alive:
        shutil.rmtree(d, ignore_errors=True)


def parse_from(prefixes: list[str]) -> tuple[ipaddress.IPv4Network | None, ipaddress.IPv6Network | str | None]:
    """The outer sources a backend takes: an IPv4 prefix, an IPv6 /96, or
    `any` (every source: only where nobody else can reach the backend)."""
    v4 = v6 = None
    for text in prefixes:
        if text == "any":
            return ipaddress.ip_network("0.0.0.0/0"), "any"
        try:
            net = ipaddress.ip_network(text)
        except ValueError as e:
            raise DecapError(f"--from {text!r}: {e}") from None
        if net.version == 4:
            v4 = net
        elif net.prefixlen != 96:
            raise DecapError(f"--from {text}: an IPv6 /96, as the load balancer's encap-source (the flow hash "
                             f"fills the rest)")
        else:
            v6 = net
    return v4, v6


def configure(obj: BpfObject, sources: list[str], gue_port: int = GUE_PORT) -> None:
    """The outer sources and the GUE port (0: none) into the program's read-only data, before load."""
    v4, v6 = parse_from(sources)
    obj.set_rodata("decap_gue_port", ctypes.c_uint16(int.from_bytes(gue_port.to_bytes(2, "big"), "little")))
    if v4 is not None:
        obj.set_rodata("decap_src4", ctypes.c_uint32(int.from_bytes(v4.network_address.packed, "little")))
        obj.set_rodata("decap_mask4", ctypes.c_uint32(int.from_bytes(v4.netmask.packed, "little")))
    if v6 == "any":
        obj.set_rodata("decap_any6", ctypes.c_uint8(1))
    elif v6 is not None:
        obj.set_rodata("decap_src6", (ctypes.c_uint8 * 12)(*v6.network_address.packed[:12]))
        obj.set_rodata("decap_no6", ctypes.c_uint8(0))


def attach(dev: str, object_path: str | None = None, sources: list[str] = DEFAULT_FROM,
           gue_port: int = GUE_PORT) -> str:
    """Attach the decapsulation program to `dev`, taking outer sources in
    `sources` (prefixes, or "any"); returns the XDP mode."""
    sources = list(sources)
    parse_from(sources)
    check_bpffs()
    d = pin_dir(dev)
    _drop_stale(d, _ifindex(dev))
    if (d / "link").exists():
        raise DecapError(f"{dev} already decapsulates (`bpfrouter decap detach {dev}` first)")
    idx = _ifindex(dev)
    obj = BpfObject(object_path or default_object())
    try:
        configure(obj, sources, gue_port)
        obj.load()
        prog = obj.program(PROGRAM)
        link = None
        for flags, mode in ((XDP_FLAGS_DRV_MODE, "native"), (XDP_FLAGS_SKB_MODE, "generic")):
            try:
                link = Link.create_xdp(prog, idx, flags)
                break
            except BpfError as e:
                if e.errno in (errno.EBUSY, errno.EEXIST):
                    raise DecapError(f"{dev} already has an XDP program attached (see `ip link show {dev}`)") \
                        from None
        if link is None:
            raise DecapError(f"the kernel refused to attach XDP to {dev}")
        d.mkdir(parents=True, exist_ok=True)
        try:
            link.pin(str(d / "link"))
            pin_object(obj.map_fd("decap_stats"), str(d / "decap_stats"))
        except BpfError as e:
            link.detach()
            shutil.rmtree(d, ignore_errors=True)
            raise DecapError(f"cannot pin the decapsulation of {dev}: {e}") from None
        link.close()
        return mode
    finally:
        obj.close()


def forget_namespace(ns_path: str) -> None:
    """Remove the pins of every decapsulation in a network namespace about
    to go (its links go with the devices; the pins would stay)."""
    try:
        ino = os.stat(ns_path).st_ino
    except OSError:
        return
    for d in (PIN_ROOT / "decap").glob(f"{ino}-*"):
        shutil.rmtree(d, ignore_errors=True)


def detach(dev: str) -> None:
    d = pin_dir(dev)
    if not (d / "link").exists():
        raise DecapError(f"{dev} does not decapsulate")
    link = Link.pinned(str(d / "link"))
    link.detach()
    link.close()
    shutil.rmtree(d, ignore_errors=True)


def stats(dev: str) -> dict[str, int]:
    d = pin_dir(dev)
    if not (d / "decap_stats").exists():
        raise DecapError(f"{dev} does not decapsulate")
    m = Map.pinned(str(d / "decap_stats"), lo.u32, lo.u64)
    try:
        # a program attached by an older version may count fewer kinds
        return {name: sum(v.value for v in per_cpu) if (per_cpu := m.lookup(lo.u32(i))) is not None else 0
                for i, name in enumerate(DECAP_STATS)}
    finally:
        m.close()
