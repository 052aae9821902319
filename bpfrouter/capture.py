"""`bpfrouter capture`: the packets the XDP program sees, with their verdict.

The router's program with the capture hook copies frames into a ring buffer
(bpf/include/capture.h). This module swaps that program in on the captured
interfaces, switches the copy on, renews its lease while it runs, filters
with a tcpdump expression compiled by libpcap, and writes pcapng (the
verdict in each packet's comment) or pcap. When the capture ends the plain
program goes back; if its reader dies, the lease expires and the agent
swaps the plain program back (release_stale)."""
from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass
from typing import Callable

from .bpf import RingBuffer
from .datapath import Datapath
from .datapath import layout as lo
from .interfaces import ifname
from .observe import XDP_ACTIONS
from .telemetry import monotonic_to_wall

DLT_EN10MB = 1
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
LEASE_NS = 3_000_000_000      # a capture whose reader stops renewing ends by itself
VERDICT_ACTIONS = {"drop": 1 << 1, "pass": 1 << 2, "redirect": 1 << 4 | 1 << 0 | 1 << 3}  # redirect: and failures
ANY = (1 << 5) - 1


class CaptureError(Exception):
    """A capture that cannot start; the message says why."""


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


class _PktHdr(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long), ("caplen", ctypes.c_uint32),
                ("len", ctypes.c_uint32)]


def _libpcap():
    name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise CaptureError("libpcap is missing: install the libpcap0.8 package") from None
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p, ctypes.c_int,
                                 ctypes.c_uint32]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_offline_filter.argtypes = [ctypes.POINTER(_BpfProgram), ctypes.POINTER(_PktHdr), ctypes.c_char_p]
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    return lib


class PcapFilter:
    """A tcpdump filter expression, compiled by libpcap for Ethernet frames."""

    def __init__(self, expression: str, snaplen: int = 65535):
        self.lib = _libpcap()
        self.expression = expression
        self.handle = self.lib.pcap_open_dead(DLT_EN10MB, snaplen)
        self.prog = _BpfProgram()
        if self.lib.pcap_compile(self.handle, ctypes.byref(self.prog), expression.encode(), 1,
                                 PCAP_NETMASK_UNKNOWN) != 0:
            err = self.lib.pcap_geterr(self.handle).decode(errors="replace")
            self.lib.pcap_close(self.handle)
            raise CaptureError(f"bad filter {expression!r}: {err}")

    def matches(self, data: bytes, wirelen: int) -> bool:
        hdr = _PktHdr(0, 0, len(data), wirelen)
        return self.lib.pcap_offline_filter(ctypes.byref(self.prog), ctypes.byref(hdr), data) != 0

    def close(self) -> None:
        if self.handle:
            self.lib.pcap_freecode(ctypes.byref(self.prog))
            self.lib.pcap_close(self.handle)
            self.handle = None


@dataclass
class Captured:
    time: float
    ifindex: int
    wirelen: int
    data: bytes
    reason: lo.Reason
    action: str
    egress_ifindex: int

    @property
    def verdict(self) -> str:
        return self.reason.verdict


def decode(raw: bytes) -> Captured:
    hdr_size = lo.CaptureRec.data.offset
    rec = lo.CaptureRec.from_buffer_copy(raw[:hdr_size].ljust(ctypes.sizeof(lo.CaptureRec), b"\0"))
    reason = lo.Reason(rec.reason) if rec.reason < lo.REASON_MAX else lo.Reason.PASS_NON_IP
    return Captured(monotonic_to_wall(rec.ts_ns), rec.ifindex, rec.len, raw[hdr_size:hdr_size + rec.caplen],
                    reason, XDP_ACTIONS.get(rec.action, str(rec.action)), rec.egress_ifindex)


class Capture:
    """One capture session on a router: at most one at a time, since the
    ring buffer has one consumer position."""

    def __init__(self, dp: Datapath, ifindex: int = 0, verdict: str = "any", snaplen: int = 262144):
        self.dp = dp
        self.ifindices = [ifindex] if ifindex else dp.linked()
        dp.capture_program()  # fails early, in one line, without the capture observer
        self.cfg = lo.CaptureCfg(active=1, ifindex=ifindex,
                                 actions=ANY if verdict == "any" else VERDICT_ACTIONS[verdict],
                                 snaplen=min(snaplen, lo.CAPTURE_MAX))
        current = dp.maps["capture_cfg"].lookup(lo.u32(0))
        if current is not None and current.active and current.expires_ns > time.monotonic_ns():
            raise CaptureError("another capture is running on this router; stop it first")
        self.rb: RingBuffer | None = None
        self.on_packet: Callable[[Captured], bool] | None = None  # None: leftovers are dropped
        self.done = False

    def renew(self) -> None:
        """Extends the lease; the hook is swapped in again in case the agent
        took it back in the instant between a stale capture and this one."""
        self.cfg.expires_ns = time.monotonic_ns() + LEASE_NS
        self.dp.maps["capture_cfg"].update(lo.u32(0), self.cfg)
        self.dp.set_capture_hook(self.ifindices, True)

    def start(self) -> None:
        """Switches the capture on; packets from here on are recorded."""
        if self.rb is None:
            self.rb = RingBuffer(self.dp.maps["capture_ring"].fd, self._deliver)
            self.rb.poll(0)  # leftovers of an earlier capture
            self.renew()

    def run(self, on_packet: Callable[[Captured], bool], stop: Callable[[], bool] = lambda: False) -> None:
        """Calls on_packet for each captured packet until it returns False or stop() is true."""
        self.on_packet, self.done = on_packet, False
        self.start()
        try:
            renewed = time.monotonic()
            while not self.done and not stop():
                self.rb.poll(100)
                if time.monotonic() - renewed > 1.0:
                    self.renew()
                    renewed = time.monotonic()
        finally:
            self.stop()

    def _deliver(self, raw: bytes) -> None:
        if self.on_packet is not None and not self.done and not self.on_packet(decode(raw)):
            self.done = True

    def stop(self) -> None:
        self.dp.set_capture_hook(self.dp.linked(), False)  # also where a dead capture left it
        self.dp.maps["capture_cfg"].update(lo.u32(0), lo.CaptureCfg())
        if self.rb is not None:
            self.rb.close()
            self.rb = None


def release_stale(dp: Datapath) -> list[int]:
    """Swaps the plain program back where a capture's lease ran out (its
    reader died); returns those interfaces. The hook is read before the
    lease, so a capture starting meanwhile (lease first, then hook) is seen."""
    hooked = dp.capture_hooked()
    if not hooked:
        return []
    cfg = dp.maps["capture_cfg"].lookup(lo.u32(0))
    if cfg is not None and cfg.active and cfg.expires_ns > time.monotonic_ns():
        return []
    dp.set_capture_hook(hooked, False)
    return hooked


class PcapWriter:
    """pcapng (default; the verdict goes into each packet's comment) or pcap
    (when the file name ends in .pcap), through scapy's public writers."""

    def __init__(self, path: str):
        from scapy.layers.l2 import Ether
        from scapy.utils import PcapNgWriter
        from scapy.utils import PcapWriter as ScapyPcapWriter
        self.ng = not path.endswith(".pcap")
        try:
            self.w = PcapNgWriter(path) if self.ng else ScapyPcapWriter(path, linktype=DLT_EN10MB)
        except OSError as e:
            raise CaptureError(f"cannot write {path}: {e.strerror}") from None
        # an Ethernet header fixes the link type (pcapng has no constructor argument for it);
        # a capture of nothing is still a valid, empty file
        self.w.write_header(Ether())

    def write(self, c: Captured) -> None:
        from scapy.packet import Raw
        # Raw, not Ether(data): the bytes go out exactly as captured, and undissected
        # (dissecting costs ~1 ms a packet); the writer takes the file's link type for it
        pkt = Raw(c.data)
        pkt.sniffed_on = ifname(c.ifindex)  # pcapng: the packet's interface block
        if self.ng:
            pkt.comment = (f"bpfrouter: {c.verdict} {c.reason.label} xdp {c.action}" +
                           (f" egress {ifname(c.egress_ifindex)}" if c.egress_ifindex and c.verdict == "redirect"
                            else "")).encode()
        # pcapng takes the float time, pcap the seconds and usec
        self.w.write_packet(pkt, sec=c.time, usec=int((c.time % 1) * 1e6), caplen=len(c.data), wirelen=c.wirelen)
        self.w.flush()

    def close(self) -> None:
        self.w.close()
