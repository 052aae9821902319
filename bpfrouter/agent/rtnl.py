"""A lean rtnetlink route reader for the agent's hot path.

pyroute2 decodes every attribute of every message into Python objects, about
30 us per route here; a routing daemon installs a full table at 60k+ routes
per second, so the mirror fell behind and overran. This module reads only what
the FIB needs (RTM_NEWROUTE / RTM_DELROUTE: family, prefix, table, type,
protocol, metric, next hops) with struct, from a raw socket with a large
receive buffer. pyroute2 still handles links, neighbors and all requests.

A route whose next hops are all dead stays in the kernel's table but carries
no traffic: RTNH_F_DEAD, which the kernel also reports for a linkdown next hop
(carrier lost) when ignore_routes_with_linkdown applies to its device. The
decoder returns it as a DeadRoute, which the mirror treats as absent. A
linkdown next hop without that sysctl is used by the kernel (IPv4 and IPv6)
and so by the mirror."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import socket
import struct

from ..fib import TABLE_LOCAL, TABLE_MAIN, Nexthop, Route, RouteType

NETLINK_ROUTE = 0
SOL_NETLINK = 270
SO_RCVBUFFORCE = 33
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNETCONF = 80
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_REPLACE, NLM_F_DUMP = 0x1, 0x2, 0x100, 0x300
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_MULTIPATH, RTA_TABLE, RTA_VIA = 1, 4, 5, 6, 9, 15, 18
RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x40, 0x400
RTMGRP_IPV4_NETCONF, RTMGRP_IPV6_NETCONF = 1 << (24 - 1), 1 << (25 - 1)  # RTNLGRP_IPV{4,6}_NETCONF
NETCONFA_IFINDEX, NETCONFA_IGNORE_ROUTES_WITH_LINKDOWN = 1, 6
RTM_F_CLONED = 0x200
RTNH_F_DEAD = 0x1
RTN = {1: RouteType.UNICAST, 2: RouteType.LOCAL, 3: RouteType.LOCAL, 4: RouteType.LOCAL,
       6: RouteType.BLACKHOLE, 7: RouteType.UNREACHABLE, 8: RouteType.PROHIBIT}
AF_INET, AF_INET6 = 2, 10

_hdr = struct.Struct("=IHHII")          # nlmsghdr
_rtmsg = struct.Struct("=BBBBBBBBI")    # rtmsg
_rta = struct.Struct("=HH")
_u32 = struct.Struct("=I")
_rtnh = struct.Struct("=HBBi")          # rtnexthop: len, flags, hops, ifindex
# The kernel's layout of an IPv4 route via a gateway, without and with a metric:
# rtmsg, RTA_TABLE, RTA_DST, [RTA_PRIORITY,] RTA_GATEWAY, RTA_OIF. One unpack
# instead of a loop: most of a full table looks like this.
_v4gw = struct.Struct("=BBBBBBBBI HHI HH4s HH4s HHI")
_v4gw_metric = struct.Struct("=BBBBBBBBI HHI HH4s HHI HH4s HHI")
_SKIP_FAST = RTM_F_CLONED | RTNH_F_DEAD  # the fast path takes neither


class DeadRoute(Route):
    """A kernel route that carries no traffic: every next hop is dead (see the
    module's docstring). Its key is a live route's, so it can delete one."""
    __slots__ = ()


class Decoder:
    """Parses route messages; interns next hops so repeated gateways cost nothing."""

    def __init__(self):
        self._hops: dict[tuple, Nexthop] = {}
        self._single: dict[tuple, tuple[Nexthop]] = {}

    def _hop(self, oif: int, gw: bytes | None) -> Nexthop:
        key = (oif, gw)
        hop = self._hops.get(key)
        if hop is None:
            hop = Nexthop(oif, ipaddress.ip_address(gw) if gw else None)
            self._hops[key] = hop
        return hop

    def _only_hop(self, oif: int, gw: bytes | None) -> tuple[Nexthop]:
        """A route's next hops when it has one: the same tuple for every route
        through it (no tuple per route in a full table)."""
        key = (oif, gw)
        hops = self._single.get(key)
        if hops is None:
            hops = self._single[key] = (self._hop(oif, gw),)
        return hops

    def messages(self, buf: bytes | memoryview):
        """Yield (type, flags, offset, length) of each message in a datagram."""
        off, end = 0, len(buf)
        while off + 16 <= end:
            length, mtype, flags, _, _ = _hdr.unpack_from(buf, off)
            if length < 16:
                break
            yield mtype, flags, off, length
            off += (length + 3) & ~3

    def route(self, buf, off: int, length: int) -> Route | None:
        """The route of an RTM_NEWROUTE/RTM_DELROUTE message: a Route, a DeadRoute,
        or None for what the mirror never holds (cached clones, other tables)."""
        if length == 60:
            (family, dst_len, _, _, _, proto, _, rtype, rflags, _, t_tab, table, _, t_dst, dst,
             _, t_gw, gw, _, t_oif, oif) = _v4gw.unpack_from(buf, off + 16)
            if family == AF_INET and (t_tab, t_dst, t_gw, t_oif) == (RTA_TABLE, RTA_DST, RTA_GATEWAY, RTA_OIF) \
                    and rtype == 1 and not rflags & _SKIP_FAST and table in (TABLE_MAIN, TABLE_LOCAL):
                return Route.from_key((4, int.from_bytes(dst, "big"), dst_len), RouteType.UNICAST,
                                      self._only_hop(oif, gw), proto, 0, table)
        elif length == 68:
            (family, dst_len, _, _, _, proto, _, rtype, rflags, _, t_tab, table, _, t_dst, dst,
             _, t_pri, metric, _, t_gw, gw, _, t_oif, oif) = _v4gw_metric.unpack_from(buf, off + 16)
            if family == AF_INET and (t_tab, t_dst, t_pri, t_gw, t_oif) == \
                    (RTA_TABLE, RTA_DST, RTA_PRIORITY, RTA_GATEWAY, RTA_OIF) \
                    and rtype == 1 and not rflags & _SKIP_FAST and table in (TABLE_MAIN, TABLE_LOCAL):
                return Route.from_key((4, int.from_bytes(dst, "big"), dst_len), RouteType.UNICAST,
                                      self._only_hop(oif, gw), proto, metric, table)
        return self._route_general(buf, off, length)

    def _route_general(self, buf, off: int, length: int) -> Route | None:
        family, dst_len, _, _, table, proto, _, rtype, rflags = _rtmsg.unpack_from(buf, off + 16)
        if rflags & RTM_F_CLONED:
            return None
        kind = RTN.get(rtype)
        if kind is None:
            return None
        dst = gw = mp = None
        oif = metric = 0
        pos, end = off + 28, off + length
        while pos + 4 <= end:
            alen, atype = _rta.unpack_from(buf, pos)
            if alen < 4:
                break
            if atype == RTA_DST:
                dst = bytes(buf[pos + 4:pos + alen])
            elif atype == RTA_OIF:
                oif = _u32.unpack_from(buf, pos + 4)[0]
            elif atype == RTA_GATEWAY:
                gw = bytes(buf[pos + 4:pos + alen])
            elif atype == RTA_PRIORITY:
                metric = _u32.unpack_from(buf, pos + 4)[0]
            elif atype == RTA_TABLE:
                table = _u32.unpack_from(buf, pos + 4)[0]
            elif atype == RTA_MULTIPATH:
                mp = (pos + 4, pos + alen)
            elif atype == RTA_VIA:
                gw = bytes(buf[pos + 6:pos + alen])  # rtvia: family (2 bytes), address
            pos += (alen + 3) & ~3
        if table not in (TABLE_MAIN, TABLE_LOCAL):
            return None
        pkey = (4 if family == AF_INET else 6, int.from_bytes(dst, "big") if dst else 0, dst_len)
        hops: tuple[Nexthop, ...] = ()
        dead = bool(rflags & RTNH_F_DEAD)  # a single next hop's flags are the route's
        if mp:
            live: list[bool] = []
            hops = tuple(self._multipath(buf, *mp, live))
            # the kernel spreads over the live ones; the data plane passes multipath
            # routes to it, so only a route with none left is gone for the mirror
            dead = dead or not any(live)
        elif kind == RouteType.UNICAST:
            if not oif:
                return None
            hops = self._only_hop(oif, gw if gw and len(gw) in (4, 16) else None)
        return (DeadRoute if dead else Route).from_key(pkey, kind, hops, proto, metric, table)

    def _multipath(self, buf, pos: int, end: int, live: list[bool]):
        """Yield each next hop; append whether it is alive to `live`."""
        while pos + 8 <= end:
            nlen, nflags, _, ifindex = _rtnh.unpack_from(buf, pos)
            if nlen < 8:
                return
            live.append(not nflags & RTNH_F_DEAD)
            gw = None
            apos = pos + 8
            while apos + 4 <= pos + nlen:
                alen, atype = _rta.unpack_from(buf, apos)
                if alen < 4:
                    break
                if atype == RTA_GATEWAY:
                    gw = bytes(buf[apos + 4:apos + alen])
                elif atype == RTA_VIA:
                    gw = bytes(buf[apos + 6:apos + alen])
                apos += (alen + 3) & ~3
            yield self._hop(ifindex, gw)
            pos += (nlen + 3) & ~3

    def events(self, buf, out: list) -> bool:
        """Append (new, replace, route) for each route message in a datagram.
        Returns True if it also said that ignore_routes_with_linkdown changed:
        routes then die or revive without a notification of their own."""
        off, end = 0, len(buf)
        route = self.route
        conf = False
        while off + 16 <= end:
            length, mtype, flags, _, _ = _hdr.unpack_from(buf, off)
            if length < 16:
                break
            if mtype == RTM_NEWROUTE or mtype == RTM_DELROUTE:
                r = route(buf, off, length)
                if r.__class__ is DeadRoute and mtype == RTM_NEWROUTE:
                    dead_event(r, flags & NLM_F_REPLACE, out)
                else:
                    out.append((mtype == RTM_NEWROUTE, flags & NLM_F_REPLACE, r))
            elif mtype == RTM_NEWNETCONF:
                conf = conf or _linkdown_conf_change(buf, off, length)
            off += (length + 3) & ~3
        return conf


def dead_event(r: DeadRoute, replace: int, out: list) -> None:
    """A route the kernel installed (or replaced another with) but does not use:
    for the mirror, the routes it replaced go, and so does any live copy of it."""
    if replace:
        out.append((True, replace, r))
    out.append((False, 0, r))


def _linkdown_conf_change(buf, off: int, length: int) -> bool:
    """An RTM_NEWNETCONF that announces a change of ignore_routes_with_linkdown:
    the kernel sends the changed attribute alone (with the ifindex). A message
    with every attribute describes a new device, which has no routes yet."""
    types = []
    pos, end = off + 20, off + length  # nlmsghdr, netconfmsg (family + padding)
    while pos + 4 <= end:
        alen, atype = _rta.unpack_from(buf, pos)
        if alen < 4:
            break
        types.append(atype)
        pos += (alen + 3) & ~3
    return sorted(types) == [NETCONFA_IFINDEX, NETCONFA_IGNORE_ROUTES_WITH_LINKDOWN]


def _socket(groups: int, rcvbuf: int) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except PermissionError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((0, groups))
    return s


class RouteMonitor:
    """Route notifications of both families, read without blocking: queued
    messages are read in a tight loop (one syscall each), and poll() waits only
    when nothing is queued. read() raises OSError(ENOBUFS) when the kernel had
    to drop notifications: the caller must drain() and resync. Also reads the
    netconf notifications of ignore_routes_with_linkdown (conf_changed), in
    order with the routes. A write to wake_fd (an eventfd) ends a wait."""

    def __init__(self, rcvbuf: int, wake_fd: int | None = None):
        self.sock = _socket(RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV4_NETCONF | RTMGRP_IPV6_NETCONF,
                            rcvbuf)
        self.sock.setblocking(False)
        self.poller = select.poll()
        self.poller.register(self.sock.fileno(), select.POLLIN)
        self.wake_fd = wake_fd
        if wake_fd is not None:
            self.poller.register(wake_fd, select.POLLIN)
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)
        self.conf_changed = False

    def read(self, decoder: "Decoder", out: list, timeout: float, limit: int) -> int:
        """Decode up to `limit` queued datagrams into `out`; if none is queued,
        wait up to `timeout` seconds for one (or a wake-up). Returns the number read."""
        n = 0
        recv_into, view, events = self.sock.recv_into, self.view, decoder.events
        while n < limit:
            try:
                size = recv_into(self.buf)
            except BlockingIOError:
                if n or timeout <= 0:
                    return n
                ready = self.poller.poll(timeout * 1000)
                if not ready:
                    return n
                if any(fd == self.wake_fd for fd, _ in ready):
                    with contextlib.suppress(BlockingIOError):  # consumed here, or poll would not wait again
                        os.eventfd_read(self.wake_fd)
                    return n  # the caller has something to do
                timeout = 0
                continue
            if events(view[:size], out):
                self.conf_changed = True
            n += 1
        return n

    def drain(self) -> None:
        """Discard everything queued. After an overrun the kernel keeps the socket
        'congested' and drops further notifications silently until the queue has
        been emptied once (NETLINK_S_CONGESTED): drain, then dump."""
        while True:
            try:
                self.sock.recv_into(self.buf)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != 105:  # a further ENOBUFS while draining is expected
                    raise

    def close(self) -> None:
        self.sock.close()


def dump_routes(decoder: Decoder, rcvbuf: int = 32 << 20, progress=None) -> list[Route]:
    """All routes of both families (main and local tables) that carry traffic,
    from a fresh dump. progress(n) is called every 65536 routes."""
    s = _socket(0, rcvbuf)
    try:
        req = _hdr.pack(16 + 12, RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + _rtmsg.pack(
            0, 0, 0, 0, 0, 0, 0, 0, 0)
        s.send(req)
        buf = bytearray(1 << 20)
        routes: list[Route] = []
        while True:
            n = s.recv_into(buf)
            view = memoryview(buf)[:n]
            for mtype, _, off, length in decoder.messages(view):
                if mtype == NLMSG_DONE:
                    return routes
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", view, off + 16)[0]
                    raise OSError(code, f"route dump failed: {os.strerror(code)}")
                if mtype == RTM_NEWROUTE:
                    r = decoder.route(view, off, length)
                    if r is not None and r.__class__ is not DeadRoute:
                        routes.append(r)
                        if progress and not len(routes) & 0xFFFF:
                            progress(len(routes))
    finally:
        s.close()

