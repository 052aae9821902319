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
from dataclasses import dataclass

from ..datapath.layout import MAX_ECMP_PATHS, Reason
from ..ecmp import NexthopGroup
from ..fib import BucketChange, Nexthop, Route, RouteType, kernel_route_bits

NETLINK_ROUTE = 0
SOL_NETLINK = 270
SO_RCVBUFFORCE = 33
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNETCONF = 80
RTM_NEWNEXTHOP, RTM_DELNEXTHOP, RTM_GETNEXTHOP = 104, 105, 106
RTM_NEWNEXTHOPBUCKET, RTM_GETNEXTHOPBUCKET = 116, 118
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_REPLACE, NLM_F_DUMP = 0x1, 0x2, 0x100, 0x300
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_MULTIPATH, RTA_TABLE, RTA_VIA = 1, 4, 5, 6, 9, 15, 18
RTA_ENCAP_TYPE, RTA_NH_ID = 21, 30
NHA_ID, NHA_GROUP, NHA_GROUP_TYPE, NHA_BLACKHOLE, NHA_OIF, NHA_GATEWAY, NHA_ENCAP_TYPE = 1, 2, 3, 4, 5, 6, 7
NHA_FDB, NHA_RES_GROUP, NHA_RES_BUCKET = 11, 12, 13
NHA_RES_GROUP_BUCKETS, NHA_RES_BUCKET_INDEX, NHA_RES_BUCKET_NH_ID = 1, 1, 3
NEXTHOP_GRP_TYPE_RES = 1
RTNLGRP_NEXTHOP = 32  # above 31: joined with NETLINK_ADD_MEMBERSHIP, not the bind mask
NETLINK_ADD_MEMBERSHIP = 1
RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x40, 0x400
RTMGRP_IPV4_NETCONF, RTMGRP_IPV6_NETCONF = 1 << (24 - 1), 1 << (25 - 1)  # RTNLGRP_IPV{4,6}_NETCONF
NETCONFA_IFINDEX, NETCONFA_IGNORE_ROUTES_WITH_LINKDOWN = 1, 6
RTM_F_CLONED = 0x200
RTN_MULTICAST = 5
RTNH_F_DEAD = 0x1
# Kernel route types (rtm_type) the fast path implements; any other (throw,
# nat, multicast, xresolve, ...) is a KERNEL route: its packets are passed.
RTN = {1: RouteType.UNICAST, 2: RouteType.LOCAL, 3: RouteType.LOCAL, 4: RouteType.LOCAL,
       6: RouteType.BLACKHOLE, 7: RouteType.UNREACHABLE, 8: RouteType.PROHIBIT}
AF_INET, AF_INET6 = 2, 10

_hdr = struct.Struct("=IHHII")          # nlmsghdr
_rtmsg = struct.Struct("=BBBBBBBBI")    # rtmsg
_rta = struct.Struct("=HH")
_u32 = struct.Struct("=I")
_rtnh = struct.Struct("=HBBi")          # rtnexthop: len, flags, hops, ifindex
_nhmsg = struct.Struct("=BBBBI")        # nhmsg: family, scope, protocol, reserved, flags
_nh_grp = struct.Struct("=IBBH")        # nexthop_grp: id, weight, weight_high, reserved
_u16 = struct.Struct("=H")
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


@dataclass(frozen=True)
class NexthopObject:
    """A kernel next-hop object (`ip nexthop`): one gateway and device, a
    blackhole, or a group of other objects' ids."""
    hop: Nexthop | None = None
    blackhole: bool = False
    group: tuple[int, ...] = ()
    encap: int = 0       # lwtunnel encapsulation type, 0: none
    dead: bool = False   # RTNH_F_DEAD: its device is down
    weights: tuple[int, ...] = ()   # a group's, per member
    buckets: int = 0     # a resilient group's bucket count; 0: hash-threshold


class Decoder:
    """Parses route and next-hop messages; interns next hops so repeated
    gateways cost nothing. Keeps the kernel's next-hop objects by id
    (`nexthop_objects`): routes that name one (RTA_NH_ID) are resolved
    through it, since with nexthop_compat_mode=0 they carry nothing else."""

    def __init__(self):
        self._hops: dict[tuple, Nexthop] = {}
        self._single: dict[tuple, tuple[Nexthop]] = {}
        self.nexthop_objects: dict[int, NexthopObject] = {}
        # resilient groups' bucket tables: group id -> member object id per bucket
        self.res_buckets: dict[int, list[int]] = {}

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
        or None for what the mirror never holds (cached clones)."""
        if length == 60:
            (family, dst_len, _, _, _, proto, _, rtype, rflags, _, t_tab, table, _, t_dst, dst,
             _, t_gw, gw, _, t_oif, oif) = _v4gw.unpack_from(buf, off + 16)
            if family == AF_INET and (t_tab, t_dst, t_gw, t_oif) == (RTA_TABLE, RTA_DST, RTA_GATEWAY, RTA_OIF) \
                    and rtype == 1 and not rflags & _SKIP_FAST and table:
                return Route.from_key((4, int.from_bytes(dst, "big"), dst_len), RouteType.UNICAST,
                                      self._only_hop(oif, gw), proto, 0, table)
        elif length == 68:
            (family, dst_len, _, _, _, proto, _, rtype, rflags, _, t_tab, table, _, t_dst, dst,
             _, t_pri, metric, _, t_gw, gw, _, t_oif, oif) = _v4gw_metric.unpack_from(buf, off + 16)
            if family == AF_INET and (t_tab, t_dst, t_pri, t_gw, t_oif) == \
                    (RTA_TABLE, RTA_DST, RTA_PRIORITY, RTA_GATEWAY, RTA_OIF) \
                    and rtype == 1 and not rflags & _SKIP_FAST and table:
                return Route.from_key((4, int.from_bytes(dst, "big"), dst_len), RouteType.UNICAST,
                                      self._only_hop(oif, gw), proto, metric, table)
        return self._route_general(buf, off, length)

    def _route_general(self, buf, off: int, length: int) -> Route | None:
        family, dst_len, _, _, table, proto, _, rtype, rflags = _rtmsg.unpack_from(buf, off + 16)
        if rflags & RTM_F_CLONED or family not in (AF_INET, AF_INET6):  # e.g. AF_MPLS's label routes
            return None
        kind = RTN.get(rtype)
        dst = gw = mp = None
        oif = metric = encap = nh_id = 0
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
            elif atype == RTA_ENCAP_TYPE:
                encap = _u16.unpack_from(buf, pos + 4)[0]
            elif atype == RTA_NH_ID:
                nh_id = _u32.unpack_from(buf, pos + 4)[0]
            pos += (alen + 3) & ~3
        if not table:
            return None
        pkey = (4 if family == AF_INET else 6, int.from_bytes(dst, "big") if dst else 0, dst_len)
        if kind is None:  # throw, nat, ...: the kernel's own
            if rtype == RTN_MULTICAST and _in_multicast_range(pkey):
                return None  # (the kernel's ff00::/8 per device) its destinations are passed before the lookup
            return Route.from_key(pkey, RouteType.KERNEL, (), proto, metric, table,
                                  kernel_route_bits(Reason.PASS_ROUTE_TYPE, rtype))
        hops: tuple[Nexthop, ...] = ()
        dead = bool(rflags & RTNH_F_DEAD)  # a single next hop's flags are the route's
        if nh_id and kind == RouteType.UNICAST:
            # a next-hop object's: with nexthop_compat_mode=1 the message repeats its
            # gateway, but only the object tells a blackhole, a group or an encap apart
            return self._object_route(pkey, nh_id, proto, metric, table, dead)
        if mp:
            paths = list(self._multipath(buf, *mp))
            encap = encap or max(e for _, _, _, e in paths)
            members = tuple((hop, weight) for hop, weight, live, _ in paths if live)
            hops = tuple(h for h, _ in members)
            # the kernel spreads over the live ones; a route with none left is gone
            dead = dead or not members
            if kind == RouteType.UNICAST and not encap and members:
                if len(members) > MAX_ECMP_PATHS:
                    return Route.from_key(pkey, RouteType.KERNEL, hops, proto, metric, table,
                                          kernel_route_bits(Reason.PASS_MULTIPATH))
                group = NexthopGroup(members, partial=len(members) < len(paths))
                return (DeadRoute if dead else Route).from_key(pkey, kind, hops, proto, metric, table, group=group)
        elif kind == RouteType.UNICAST:
            if not oif:
                return None
            hops = self._only_hop(oif, gw if gw and len(gw) in (4, 16) else None)
        if encap and kind == RouteType.UNICAST:
            # lwtunnel (mpls, ip, seg6, ...): forwarding without it would send the packet bare
            return (DeadRoute if dead else Route).from_key(pkey, RouteType.KERNEL, hops, proto, metric, table,
                                                            kernel_route_bits(Reason.PASS_ENCAP, rtype, encap))
        return (DeadRoute if dead else Route).from_key(pkey, kind, hops, proto, metric, table)

    def _object_route(self, pkey, nh_id: int, proto: int, metric: int, table: int, dead: bool) -> Route:
        """A unicast route through next-hop object nh_id, as the kernel forwards it."""
        obj = self.nexthop_objects.get(nh_id)
        if obj is None:  # the kernel announces an object before its routes; pass if not
            return Route.from_key(pkey, RouteType.KERNEL, (), proto, metric, table,
                                  kernel_route_bits(Reason.PASS_NEXTHOP_INVALID))
        if obj.blackhole:
            return Route.from_key(pkey, RouteType.BLACKHOLE, (), proto, metric, table)
        if obj.group:
            return self._group_route(pkey, nh_id, obj, proto, metric, table, dead)
        cls = DeadRoute if dead or obj.dead else Route
        if obj.encap or obj.hop is None:
            return cls.from_key(pkey, RouteType.KERNEL, (obj.hop,) if obj.hop else (), proto, metric, table,
                                kernel_route_bits(Reason.PASS_ENCAP if obj.encap else Reason.PASS_ROUTE_TYPE,
                                                  1, obj.encap))
        return cls.from_key(pkey, RouteType.UNICAST, self._only_hop(obj.hop.ifindex, obj.hop.gateway.packed
                                                                     if obj.hop.gateway else None),
                            proto, metric, table)

    def _group_route(self, pkey, nh_id: int, obj: NexthopObject, proto: int, metric: int, table: int,
                     dead: bool) -> Route:
        """A route through kernel next-hop group nh_id: its live members, by weight;
        a resilient group's with the kernel's bucket table."""
        objs = self.nexthop_objects
        members = tuple((m.hop, w) for i, w in zip(obj.group, obj.weights, strict=True)
                        if (m := objs.get(i)) is not None and m.hop is not None and not m.dead and not m.encap)
        hops = tuple(h for h, _ in members)
        if dead or not members:
            return DeadRoute.from_key(pkey, RouteType.UNICAST, hops, proto, metric, table)
        bucket_hops: tuple = ()
        if obj.buckets:
            table_ = self.res_buckets.get(nh_id, [])
            bucket_hops = tuple(objs[i].hop if i in objs and objs[i].hop else None for i in table_)
        if len(members) > MAX_ECMP_PATHS or len(members) < len(obj.group) and obj.buckets or \
                obj.buckets and (len(bucket_hops) != obj.buckets or not set(bucket_hops) <= set(hops)):
            # wider than a group here, or a resilient group whose buckets are not all known
            return Route.from_key(pkey, RouteType.KERNEL, hops, proto, metric, table,
                                  kernel_route_bits(Reason.PASS_MULTIPATH))
        group = NexthopGroup(members, nh_id if obj.buckets else 0, obj.buckets, len(members) < len(obj.group),
                             bucket_hops)
        return Route.from_key(pkey, RouteType.UNICAST, hops, proto, metric, table, group=group)

    def _multipath(self, buf, pos: int, end: int):
        """Yield (next hop, weight, alive, encap type) for each path of RTA_MULTIPATH."""
        while pos + 8 <= end:
            nlen, nflags, weight, ifindex = _rtnh.unpack_from(buf, pos)
            if nlen < 8:
                return
            gw = None
            encap = 0
            apos = pos + 8
            while apos + 4 <= pos + nlen:
                alen, atype = _rta.unpack_from(buf, apos)
                if alen < 4:
                    break
                if atype == RTA_GATEWAY:
                    gw = bytes(buf[apos + 4:apos + alen])
                elif atype == RTA_VIA:
                    gw = bytes(buf[apos + 6:apos + alen])
                elif atype == RTA_ENCAP_TYPE:
                    encap = _u16.unpack_from(buf, apos + 4)[0]
                apos += (alen + 3) & ~3
            yield self._hop(ifindex, gw), weight + 1, not nflags & RTNH_F_DEAD, encap
            pos += (nlen + 3) & ~3

    def nexthop_object(self, buf, off: int, length: int) -> tuple[int, NexthopObject | None]:
        """(id, object) of an RTM_NEWNEXTHOP/RTM_DELNEXTHOP message; None for an
        object routes cannot use (fdb next hops, which only vxlan uses)."""
        _, _, _, _, nflags = _nhmsg.unpack_from(buf, off + 16)
        nh_id = oif = encap = 0
        gw = None
        blackhole = fdb = False
        group: list[int] = []
        weights: list[int] = []
        buckets = 0
        pos, end = off + 24, off + length
        while pos + 4 <= end:
            alen, atype = _rta.unpack_from(buf, pos)
            if alen < 4:
                break
            if atype == NHA_ID:
                nh_id = _u32.unpack_from(buf, pos + 4)[0]
            elif atype == NHA_OIF:
                oif = _u32.unpack_from(buf, pos + 4)[0]
            elif atype == NHA_GATEWAY:
                gw = bytes(buf[pos + 4:pos + alen])
            elif atype == NHA_BLACKHOLE:
                blackhole = True
            elif atype == NHA_ENCAP_TYPE:
                encap = _u16.unpack_from(buf, pos + 4)[0]
            elif atype == NHA_FDB:
                fdb = True
            elif atype == NHA_GROUP:
                for p in range(pos + 4, pos + alen - 7, 8):
                    member, weight, weight_high, _ = _nh_grp.unpack_from(buf, p)
                    group.append(member)
                    weights.append((weight | weight_high << 8) + 1)
            elif atype & 0x3FFF == NHA_RES_GROUP:  # nested: NLA_F_NESTED set
                for apos, atype2, alen2 in _nested(buf, pos + 4, pos + alen):
                    if atype2 == NHA_RES_GROUP_BUCKETS:
                        buckets = _u16.unpack_from(buf, apos + 4)[0]
            pos += (alen + 3) & ~3
        if fdb:
            return nh_id, None
        hop = self._hop(oif, gw if gw and len(gw) in (4, 16) else None) if oif else None
        return nh_id, NexthopObject(hop, blackhole, tuple(group), encap, bool(nflags & RTNH_F_DEAD), tuple(weights),
                                    buckets)

    def bucket(self, buf, off: int, length: int) -> tuple[int, int, int] | None:
        """(group id, bucket index, member id) of an RTM_NEWNEXTHOPBUCKET message."""
        gid = index = member = None
        for pos, atype, alen in _nested(buf, off + 24, off + length):
            if atype == NHA_ID:
                gid = _u32.unpack_from(buf, pos + 4)[0]
            elif atype == NHA_RES_BUCKET:
                for apos, atype2, _ in _nested(buf, pos + 4, pos + alen):
                    if atype2 == NHA_RES_BUCKET_INDEX:
                        index = _u16.unpack_from(buf, apos + 4)[0]
                    elif atype2 == NHA_RES_BUCKET_NH_ID:
                        member = _u32.unpack_from(buf, apos + 4)[0]
        if gid is None or index is None or member is None:
            return None
        return gid, index, member

    def apply_bucket(self, buf, off: int, length: int) -> BucketChange | None:
        """Record a bucket's member; the change for the FIB's copy."""
        got = self.bucket(buf, off, length)
        if got is None:
            return None
        gid, index, member = got
        table = self.res_buckets.setdefault(gid, [])
        if index >= len(table):
            table.extend([0] * (index + 1 - len(table)))
        table[index] = member
        obj = self.nexthop_objects.get(member)
        return BucketChange(gid, index, obj.hop if obj is not None else None)

    def apply_nexthop(self, new: bool, buf, off: int, length: int) -> bool:
        """Apply a next-hop object message to `nexthop_objects`. True when it
        replaced or deleted an object routes may use: the kernel changes those
        routes without a notification (nexthop_compat_mode=0), so the caller
        must read the routes again."""
        nh_id, obj = self.nexthop_object(buf, off, length)
        old = self.nexthop_objects.get(nh_id)
        if new and obj is not None:
            self.nexthop_objects[nh_id] = obj
            if old is not None and old != obj:
                # a resilient group's buckets are stale until its next dump: its
                # routes go to the kernel meanwhile (_group_route)
                self.res_buckets.pop(nh_id, None)
            # a new resilient group's buckets are read with the routes
            return old is not None and old != obj or old is None and obj.buckets > 0
        self.nexthop_objects.pop(nh_id, None)
        return old is not None

    def events(self, buf, out: list) -> str:
        """Append (new, replace, route) for each route message in a datagram,
        and apply its next-hop object messages. Returns why the routes must be
        read again ("" if they need not): ignore_routes_with_linkdown changed,
        or a next-hop object routes use was replaced or deleted; routes then
        change without a notification of their own."""
        off, end = 0, len(buf)
        route = self.route
        conf = ""
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
                if _linkdown_conf_change(buf, off, length):
                    conf = conf or "ignore_routes_with_linkdown changed"
            elif mtype == RTM_NEWNEXTHOP or mtype == RTM_DELNEXTHOP:
                if self.apply_nexthop(mtype == RTM_NEWNEXTHOP, buf, off, length):
                    conf = conf or "next-hop object replaced or deleted"
            elif mtype == RTM_NEWNEXTHOPBUCKET:
                change = self.apply_bucket(buf, off, length)
                if change is not None:
                    out.append((True, 0, change))
            off += (length + 3) & ~3
        return conf


def _nested(buf, pos: int, end: int):
    """Yield (offset, type, length) of each attribute in [pos, end)."""
    while pos + 4 <= end:
        alen, atype = _rta.unpack_from(buf, pos)
        if alen < 4:
            return
        yield pos, atype & 0x3FFF, alen
        pos += (alen + 3) & ~3


def _in_multicast_range(pkey) -> bool:
    """A prefix inside 224.0.0.0/4 or ff00::/8, whose packets the data plane
    passes as multicast before any route lookup."""
    version, addr, length = pkey
    if version == 4:
        return length >= 4 and addr >> 28 == 0xE
    return length >= 8 and addr >> 120 == 0xFF


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
        # next-hop objects on the same socket: in order with the routes that use them
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, RTNLGRP_NEXTHOP)
        self.sock.setblocking(False)
        self.poller = select.poll()
        self.poller.register(self.sock.fileno(), select.POLLIN)
        self.wake_fd = wake_fd
        if wake_fd is not None:
            self.poller.register(wake_fd, select.POLLIN)
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)
        self.conf_changed = ""  # why routes changed without notifications ("" : they did not)

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
            why = events(view[:size], out)
            if why:
                self.conf_changed = why
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


def _dump(s: socket.socket, decoder: Decoder, mtype: int, body: bytes, seq: int, each) -> None:
    """Send a dump request and call each(view, offset, length) per message."""
    s.send(_hdr.pack(16 + len(body), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
    buf = bytearray(1 << 20)
    while True:
        n = s.recv_into(buf)
        view = memoryview(buf)[:n]
        for rtype, _, off, length in decoder.messages(view):
            if rtype == NLMSG_DONE:
                return
            if rtype == NLMSG_ERROR:
                code = -struct.unpack_from("=i", view, off + 16)[0]
                raise OSError(code, f"dump failed: {os.strerror(code)}")
            each(view, off, length)


def dump_nexthop_objects(decoder: Decoder, s: socket.socket) -> None:
    """Replace the decoder's next-hop objects with a fresh dump's."""
    objects: dict[int, NexthopObject] = {}

    def each(view, off, length):
        nh_id, obj = decoder.nexthop_object(view, off, length)
        if obj is not None:
            objects[nh_id] = obj
    _dump(s, decoder, RTM_GETNEXTHOP, _nhmsg.pack(0, 0, 0, 0, 0), 2, each)
    buckets: dict[int, list[int]] = {}

    def each_bucket(view, off, length):
        got = decoder.bucket(view, off, length)
        if got is not None:
            gid, index, member = got
            table = buckets.setdefault(gid, [])
            if index >= len(table):
                table.extend([0] * (index + 1 - len(table)))
            table[index] = member
    if any(o.buckets for o in objects.values()):
        _dump(s, decoder, RTM_GETNEXTHOPBUCKET, _nhmsg.pack(0, 0, 0, 0, 0), 3, each_bucket)
    decoder.nexthop_objects = objects
    decoder.res_buckets = buckets


def dump_routes(decoder: Decoder, rcvbuf: int = 32 << 20, progress=None) -> list[Route]:
    """All routes of both families (every table) that carry traffic,
    from a fresh dump, after the next-hop objects they may name.
    progress(n) is called every 65536 routes."""
    s = _socket(0, rcvbuf)
    routes: list[Route] = []

    def each(view, off, length):
        if _hdr.unpack_from(view, off)[1] != RTM_NEWROUTE:
            return
        r = decoder.route(view, off, length)
        if r is not None and r.__class__ is not DeadRoute:
            routes.append(r)
            if progress and not len(routes) & 0xFFFF:
                progress(len(routes))
    try:
        dump_nexthop_objects(decoder, s)
        _dump(s, decoder, RTM_GETROUTE, _rtmsg.pack(0, 0, 0, 0, 0, 0, 0, 0, 0), 1, each)
        return routes
    finally:
        s.close()
