"""The backend's decapsulation (bpf/decap.bpf.c): attach, detach, count.

Run in the backend's network namespace. The XDP link and the counters are
pinned under /sys/fs/bpf/bpfrouter/decap/<netns inode>-<ifindex>, so the
attachment outlives the command, and `show`/`detach` find it again."""
from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

from ..bpf import BpfError, BpfObject, Link, Map, XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE, pin_object
from ..datapath.datapath import PIN_ROOT, check_bpffs, default_object as router_object
from ..datapath import layout as lo

DECAP_STATS = ("v4_in_v4", "v6_in_v4", "v4_in_v6", "v6_in_v6", "failed")
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


def attach(dev: str, object_path: str | None = None) -> str:
    """Attach the decapsulation program to `dev`; returns the XDP mode."""
    check_bpffs()
    d = pin_dir(dev)
    _drop_stale(d, _ifindex(dev))
    if (d / "link").exists():
        raise DecapError(f"{dev} already decapsulates (`bpfrouter decap detach {dev}` first)")
    idx = _ifindex(dev)
    obj = BpfObject(object_path or default_object())
    try:
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
        return {name: sum(v.value for v in m.lookup(lo.u32(i))) for i, name in enumerate(DECAP_STATS)}
    finally:
        m.close()
