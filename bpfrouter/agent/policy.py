"""The kernel's per-port policy (forwarding, rp_filter, accept_local,
route_localnet, IPv4 addresses, custom rules) mirrored into the data plane's
interface flags (bpfrouter/interfaces.py, bpf/include/iface.h), and the
multipath hash sysctls (ecmp.py).

forwarding and rp_filter changes arrive as RTM_NEWNETCONF, address and rule
changes as their own notifications; accept_local and route_localnet send
none. So the mirror re-reads everything on any of those messages and once a
second: cheap /proc and netlink reads, one write per port that changed."""
from __future__ import annotations

import logging
import select
import socket
import threading

from pyroute2 import IPRoute

from ..interfaces import Interfaces, ifname, policy_flags

log = logging.getLogger("bpfrouter.agent")

RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_RULE, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x80, 0x100
RTMGRP_IPV4_NETCONF, RTMGRP_IPV6_NETCONF = 1 << 23, 1 << 24
GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_RULE | RTMGRP_IPV6_IFADDR
          | RTMGRP_IPV4_NETCONF | RTMGRP_IPV6_NETCONF)
REFRESH_SECONDS = 1.0
# IPv4's rules after boot: local, main, default. Any other (even one added and
# deleted again: the kernel's fib_has_custom_rules stays set) changes the
# route back to a source; while one exists the fast path cannot check sources.
DEFAULT_RULES = {(0, 255), (32766, 254), (32767, 253)}


def custom_rules(ipr: IPRoute) -> bool:
    for r in ipr.get_rules(family=socket.AF_INET):
        table = r.get_attr("FRA_TABLE") or r["table"]
        if (r.get_attr("FRA_PRIORITY") or 0, table) not in DEFAULT_RULES or r.get_attr("FRA_IIFNAME") \
                or r.get_attr("FRA_OIFNAME") or r["src_len"] or r["dst_len"] or r.get_attr("FRA_FWMARK"):
            return True
    return False


def read_flags(ipr: IPRoute, ifindexes, local_elsewhere: bool = False) -> dict[int, int]:
    """Each port's flags from the kernel as it is now. local_elsewhere: a
    table besides local and main holds local routes (Fib.local_kind_elsewhere)."""
    with_addr4 = {a["index"] for a in ipr.get_addr(family=socket.AF_INET)}
    enslaved = {m["index"] for m in ipr.get_links() if m.get_attr("IFLA_MASTER")}
    custom = custom_rules(ipr)
    return {i: int(policy_flags(ifname(i), i in with_addr4, i in enslaved or (custom and local_elsewhere), custom))
            for i in ifindexes}


class PolicyMirror:
    """A thread that keeps the interface flags equal to the kernel's policy."""

    def __init__(self, interfaces: Interfaces, lock: threading.RLock, stop: threading.Event,
                 also=lambda: None, local_elsewhere=lambda: False):
        self.interfaces = interfaces
        self.local_elsewhere = local_elsewhere
        self.also = also  # more sysctls to mirror with each refresh
        self.lock = lock
        self.stop = stop
        self.refreshes = 0
        self.changes = 0

    def refresh(self, ipr: IPRoute) -> int:
        """Re-read and write what changed; returns the number of ports changed."""
        with self.lock:
            configured = self.interfaces.configured()
            flags = read_flags(ipr, configured, self.local_elsewhere())
            changed = [i for i, f in flags.items() if self.interfaces.set_flags(i, f)]
            self.also()
        self.refreshes += 1
        self.changes += len(changed)
        for i in changed:
            log.info("kernel policy of %s mirrored: %s", ifname(i), flags[i])
        return len(changed)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._loop()
            except Exception:
                log.exception("policy mirror failed; restarting it")
                self.stop.wait(1.0)

    def _loop(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        try:
            sock.bind((0, GROUPS))
            sock.setblocking(False)
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            with IPRoute() as ipr:
                while not self.stop.is_set():
                    self.refresh(ipr)
                    poller.poll(REFRESH_SECONDS * 1000)
                    while True:  # one refresh covers every message queued
                        try:
                            sock.recv(1 << 16)
                        except BlockingIOError:
                            break
                        except OSError:  # ENOBUFS: the refresh reads everything anyway
                            continue
        finally:
            sock.close()

    def start(self) -> None:
        threading.Thread(target=self.run, name="policy", daemon=True).start()
