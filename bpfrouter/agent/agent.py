"""The agent: keeps one router's data plane in sync with the kernel and
serves the control API (static routes) on a Unix socket.

It is the only writer of the FIB, next-hop and neighbor maps: an exclusive
lock (agent.lock, flock) refuses a second agent for the same router, and the
kernel releases it when the holder dies, so a crash never blocks a restart.
It holds no state that the pinned maps and the kernel cannot give back, so it
can be killed and restarted at any time while the data plane keeps forwarding.

Routes follow link state too: when a link goes down, loses its carrier or an
address, or disappears, the kernel changes routes without telling (IPv4
flushes a downed link's routes with no RTM_DELROUTE; a lost carrier flags next
hops linkdown, dead with ignore_routes_with_linkdown). Each such change makes
the route thread dump the routes again, after the route events queued before
it, so the mirror ends up where the kernel is and a dump never undoes a newer
event.

Ordering of dumps and events. The route socket is bound before any dump.
Every route dump is taken by the route thread, under the lock, right after
it discarded the route events queued so far: those are older than the dump,
which supersedes them (replaying them could bring back a route the kernel
flushed silently in between). Events queued during the dump are applied
after it, in order; each is a route's whole new state, so replaying one the
dump already holds changes nothing. A silent change during a dump is a link
change, whose event asks for another dump. At start the links are dumped
before the routes: a link change the link dump missed asks for a route dump
after it, and one it saw happened before the route events were discarded."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import logging
import os
import signal
import socketserver
import subprocess
import threading
import time

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_RULE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_RULE,
                                   RTMGRP_LINK, RTMGRP_NEIGH)

from .. import capture, metrics
from ..datapath import Datapath, RouterMeta
from ..ecmp import mirror_hash_config
from ..datapath.layout import IFACE_F_PASS_POLICY4, IFACE_F_PASS_POLICY6, RTPROT_BPFROUTER, proto_name
from ..fib import TABLE_MAIN, Fib, FibError, Route, RouteType, kernel_route_info, prefix_key
from ..interfaces import Interfaces, ifname
from ..neighbors import POKE_SECONDS, Neighbors
from ..routespec import RouteSpec, RouteSpecError, parse_route
from ..telemetry import fill_warnings, map_fill
from .kernel import IFF_LOWER_UP, link_from_msg, neigh_from_msg
from .paths import AgentRunning, lock_path, pid_path, socket_path
from .policy import PolicyMirror
from ..policy.image import RuleImage
from ..policy.rules import AF_INET, AF_INET6, RuleSyntaxError, dump_rules, merge_own, parse_own_rule, table_name
from .rules import own_rule_json, read_ports, sync_rules
from .lb import Balancer
from ..lb.service import ServiceError
from .rtnl import DeadRoute, Decoder, RouteMonitor, dead_event, dump_routes

log = logging.getLogger("bpfrouter.agent")

NLM_F_REPLACE = 0x100
# addresses too: removing one removes routes, some of them silently
# rules too: they decide which ports' packets the kernel must route (agent/rules.py)
LINK_NEIGH_GROUPS = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_RULE \
    | RTMGRP_IPV6_RULE
# Receive buffer of the monitor sockets (SO_RCVBUFFORCE, so it may exceed
# net.core.rmem_max): a full table arriving at once fits. A small value makes
# overruns, and the resync they trigger, easy to test.
NETLINK_RCVBUF = int(os.environ.get("BPFROUTER_NETLINK_RCVBUF", 256 << 20))
# The RIB holds one small acyclic object graph per route; default GC
# thresholds would walk all of them every few thousand allocations, stalling
# the agent for a second at a time with a full table. (The benchmark uses the
# same thresholds, and freezes the mirror after a load as a resync does.)
GC_THRESHOLDS = (200_000, 50, 1000)
BATCH_ROUTES = 20000      # apply at most this many route events at once...
BATCH_SECONDS = 0.05      # ...and never hold one back longer than this
FILL_CHECK_SECONDS = 60    # how often the agent checks how full the maps are
RETRY_LEFT_OUT_SECONDS = 10  # a full FIB's left-out routes are retried at most this often, after deletions
BURST_ROUTES = 2000       # a batch this large pauses the garbage collector until idle
# A command run at named points of a sync, with the point as its argument
# ("start": sockets bound, before any dump; "routes-dumped": a route dump
# taken, not yet applied), so a test can change the kernel exactly there.
SYNC_HOOK = os.environ.get("BPFROUTER_SYNC_HOOK")


LB_OPS = ("services", "service_add", "service_del", "backend_add", "backend_del", "backend_weight", "backend_drain",
          "lb_set")


class ApiError(Exception):
    pass


def take_lock(name: str) -> int:
    """Hold the router's agent lock (an fd, kept open for the process's life)
    or raise AgentRunning. flock, not a pid check: the kernel drops it when
    its holder dies, so a stale lock file never blocks a restart."""
    fd = os.open(lock_path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AgentRunning(f"an agent for router {name!r} already runs (pid {holder}); "
                           f"stop it first with `bpfrouter agent stop --name {name}`") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class Agent:
    def __init__(self, name: str):
        self.meta = RouterMeta.load(name)
        self.name = name
        # before anything opens the maps: a writer recovering the FIB may move blocks
        self.lock_fd = take_lock(name)
        self.dp = Datapath.open(name, self.meta.object_path)
        self.fib = Fib(self.dp)
        self.rules = RuleImage(self.dp)
        self.policy_due: str | None = None  # why the rules must be compiled again
        self.own_rules = self._load_own_rules()
        self.neighbors = Neighbors(self.dp)
        self.interfaces = Interfaces(self.dp)
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.lb = Balancer(self.dp, RouterMeta.path(name).parent / "services.json", self.lock,
                           self.interfaces.set_lb_flags)
        self.policy = PolicyMirror(self.interfaces, self.lock, self.stop, also=lambda: mirror_hash_config(self.dp),
                                   local_elsewhere=self.fib.local_kind_elsewhere)
        self.ready = threading.Event()
        self.decoder = Decoder()
        self.link_states: dict[int, tuple] = {}  # ifindex -> LinkInfo.state, every link
        # Route resyncs asked for by other threads, run by the route thread:
        # (reasons, tickets asked, tickets done); the eventfd wakes it.
        self.resync_cond = threading.Condition()
        self.resync_why: list[str] = []
        self.resync_asked = self.resync_done = 0
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

        self.stats = {"started": time.time(), "events": 0, "resyncs": 0, "enobufs": 0,
                      "last_resync": None, "sync": None}

    # --- kernel sync -------------------------------------------------------------
    def full_sync(self, why: str, mon: RouteMonitor) -> None:
        """Links, neighbors and routes from fresh dumps: at start, before the
        link thread applies events (it waits for `synced`). Links first (see
        the module's docstring), and the route events queued before the route
        dump discarded."""
        t0 = time.monotonic()
        sync_hook("start")
        self.stats["sync"] = {"phase": "dump", "routes": 0}
        links, neighs = self._dump_links_neighs()
        with self.lock:  # (no API call before `ready`: the lock only orders this with echoes)
            self._discard_queued(mon)
            routes = dump_routes(self.decoder, progress=lambda n: self.stats.__setitem__(
                "sync", {"phase": "dump", "routes": n}))
            sync_hook("routes-dumped")
        self.stats["sync"] = {"phase": "apply", "routes": len(routes)}
        with self.lock:
            self._sync_links(links)
            with IPRoute() as ipr:  # before the first event: the thread keeps it current
                self.policy.refresh(ipr)
            self.sync_policy("start")
            changed = self.fib.replace_all(routes)
            self.neighbors.replace_all(neighs)
            self._synced()
        gc.freeze()  # the mirror's million objects: out of every later collection
        log.info("full resync (%s): %d routes, %d neighbors, %d prefixes changed in %.1f ms",
                 why, len(routes), len(neighs), changed, (time.monotonic() - t0) * 1e3)

    def _synced(self) -> None:
        self.stats["resyncs"] += 1
        self.stats["last_resync"] = time.time()
        self.stats["sync"] = None

    @staticmethod
    def _dump_links_neighs():
        with IPRoute() as ipr:
            links = [link_from_msg(m) for m in ipr.link("dump")]
            neighs = [n for m in ipr.neigh("dump") if (n := neigh_from_msg(m))]
        return links, neighs

    def sync_links_neighs(self, why: str) -> None:
        """Links and neighbors again, on the link thread (the one that applies
        their events), and the routes after them on the route thread: events
        lost on the link socket may have been link changes."""
        links, neighs = self._dump_links_neighs()
        with self.lock:
            self._sync_links(links)
            self.neighbors.replace_all(neighs)
            self.sync_policy(why)
        log.info("links and neighbors resynced (%s): %d links, %d neighbors", why, len(links), len(neighs))
        self.request_resync(why)

    def request_resync(self, why: str) -> int:
        """Ask the route thread to dump the routes again; returns a ticket for wait_resync."""
        with self.resync_cond:
            if why not in self.resync_why:
                self.resync_why.append(why)
            self.resync_asked += 1
            ticket = self.resync_asked
        os.eventfd_write(self.wake_fd, 1)
        return ticket

    def wait_resync(self, ticket: int, timeout: float) -> bool:
        with self.resync_cond:
            return self.resync_cond.wait_for(lambda: self.resync_done >= ticket, timeout)

    def _resync_routes(self, mon: RouteMonitor) -> None:
        """Dump the routes again, asked for by another thread (link state) or a
        netconf change. The route events queued before the request are older
        than the change behind it: applied after the dump, they could bring
        back a route the kernel flushed silently; sync_routes discards them."""
        with self.resync_cond:
            why, self.resync_why = self.resync_why, []
            upto = self.resync_asked  # a later request may still have older events queued
        self.sync_routes(", ".join(why) or "requested", mon, upto)

    def _discard_queued(self, mon: RouteMonitor) -> None:
        """Drop the route events queued so far: the dump that follows supersedes them."""
        mon.drain()
        mon.conf_changed = ""  # a netconf or next-hop change among them: the dump covers it too

    def sync_routes(self, why: str, mon: RouteMonitor, upto: int | None = None) -> None:
        """Routes from a fresh dump, rewriting only what differs. Route thread
        only (it applies the route events): the events queued before the dump
        are discarded, those after it applied after it. Resync requests up to
        ticket `upto` (default: all so far) are then done."""
        t0 = time.monotonic()
        if upto is None:
            with self.resync_cond:
                upto = self.resync_asked
        with self.lock:  # no API echo between dump and apply
            self._discard_queued(mon)
            routes = dump_routes(self.decoder)
            sync_hook("routes-dumped")
            changed = self.fib.replace_all(routes)
            self._synced()
        with self.resync_cond:
            self.resync_done = max(self.resync_done, upto)
            self.resync_cond.notify_all()
        log.info("routes resynced (%s): %d routes, %d prefixes changed in %.1f ms",
                 why, len(routes), changed, (time.monotonic() - t0) * 1e3)

    def sync_policy(self, why: str) -> None:
        """Mirror the kernel's rules into the fast path (agent/rules.py), and
        pass the families it cannot follow; caller holds the lock."""
        with IPRoute() as ipr:
            ports = read_ports(ipr, list(self.interfaces.configured()))
        flags, reasons = sync_rules(self.rules, ports, self.own_rules)
        changed = self.interfaces.set_rule_pass_flags(flags)
        self.interfaces.set_lb_flags(self.lb.image.families())  # a new port has none yet
        if reasons != self.stats.get("policy"):
            log.info("policy routing (%s): %s", why, "; ".join(f"{fam}: {r}" for fam, r in reasons.items())
                     or "default rules")
        self.stats["policy"] = reasons
        if changed:
            bits = (("ipv4", IFACE_F_PASS_POLICY4), ("ipv6", IFACE_F_PASS_POLICY6))
            passed = [f"{ifname(i)} ({'+'.join(f for f, bit in bits if b & bit)})"
                      for i, b in sorted(flags.items()) if b & (IFACE_F_PASS_POLICY4 | IFACE_F_PASS_POLICY6)]
            log.info("policy routing: passed to the kernel: %s", ", ".join(passed) or "nothing")

    def _link_event(self, event: str, li) -> None:
        """A link's state changed (admin, carrier, operstate) or it went away:
        the kernel changed its routes, IPv4's without notifications."""
        if event == "RTM_DELLINK":
            self.link_states.pop(li.ifindex, None)
            self.request_resync(f"link {li.name} deleted")
            return
        before = self.link_states.get(li.ifindex)
        self.link_states[li.ifindex] = li.state
        # a new link (before None) has no routes yet
        if before is not None and before != li.state:
            carrier = "carrier" if li.state[0] & IFF_LOWER_UP else "no carrier"
            self.request_resync(f"link {li.name} {'up' if li.up else 'down'}, {carrier}, operstate {li.state[1]}")

    def _sync_links(self, links) -> None:
        self.link_states = {li.ifindex: li.state for li in links}
        configured = self.interfaces.configured()
        by_index = {li.ifindex: li for li in links}
        for ifindex in configured:
            li = by_index.get(ifindex)
            if li is None:
                log.warning("interface %d disappeared; removing it from the data plane", ifindex)
                self.interfaces.remove(ifindex)
                self.dp.detach(ifindex)
            else:
                self.interfaces.configure(ifindex, li.mac, li.mtu, group=li.group)

    def handle(self, msg) -> None:
        event = msg["event"]
        with self.lock:
            self.stats["events"] += 1
            if event in ("RTM_NEWROUTE", "RTM_DELROUTE"):
                # the same decoder as the route monitor, on the message's raw bytes
                route = self.decoder.route(msg.data, getattr(msg, "offset", 0), msg["header"]["length"])
                replace = msg["header"]["flags"] & NLM_F_REPLACE
                if route is None:
                    pass
                elif event == "RTM_NEWROUTE" and route.__class__ is DeadRoute:
                    events: list = []
                    dead_event(route, replace, events)
                    self.fib.apply_batch(events)
                elif event == "RTM_NEWROUTE":
                    self.fib.update(route, replace=bool(replace))
                else:
                    self.fib.delete(route)
            elif event in ("RTM_NEWNEIGH", "RTM_DELNEIGH"):
                n = neigh_from_msg(msg)
                if n:
                    if event == "RTM_DELNEIGH":
                        self.neighbors.delete(n[0], n[1])
                    else:
                        self.neighbors.set(*n)
            elif event == "RTM_DELADDR":
                # the address's routes go; without its device's last IPv4 address,
                # all of the device's IPv4 routes, silently
                self.request_resync(f"address removed from {ifname(msg['index'])}")
            elif event in ("RTM_NEWLINK", "RTM_DELLINK"):
                li = link_from_msg(msg)
                self._link_event(event, li)
                if li.ifindex in self.interfaces.configured():
                    if event == "RTM_DELLINK":
                        self.interfaces.remove(li.ifindex)
                        self.dp.detach(li.ifindex)
                    else:
                        self.interfaces.configure(li.ifindex, li.mac, li.mtu, group=li.group)
                self.policy_due = f"link {li.name}"  # names and masters decide what `iif` rules match
            elif event in ("RTM_NEWRULE", "RTM_DELRULE"):
                self.policy_due = "rules changed"

    def _own_rules_path(self):
        return RouterMeta.path(self.name).parent / "rules.json"

    def _load_own_rules(self) -> list:
        """bpfrouter's own rules, kept across agent restarts in the run directory."""
        try:
            saved = json.loads(self._own_rules_path().read_text())
        except FileNotFoundError:
            return []
        return [parse_own_rule(x["words"], x["family"]) for x in saved]

    def _save_own_rules(self) -> None:
        p = self._own_rules_path()
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps([own_rule_json(r) for r in self.own_rules]))
        tmp.replace(p)

    def _rule_change(self, op: str, args: list[str], family: int | None) -> dict:
        """`rule add|del`: a rule with bpfrouter's own selector (dscp) is the
        fast path's alone; any other is the kernel's (`ip rule`, protocol
        bpfrouter). Either way the walk is compiled again before this returns."""
        if "dscp" in args:
            try:
                rule = parse_own_rule(args, {4: AF_INET, 6: AF_INET6}.get(family))
            except RuleSyntaxError as e:
                raise ApiError(str(e)) from None
            same = [r for r in self.own_rules if r == rule]
            if op == "rule_add":
                if same:
                    raise ApiError(f"rule {rule.priority} ({rule.text()}) already exists")
                self.own_rules.append(rule)
            else:
                if not same:
                    raise ApiError(f"no rule of bpfrouter's own is `pref {rule.priority} {rule.text()}`")
                self.own_rules.remove(same[0])
            self._save_own_rules()
        else:
            fam = ["-6"] if family == 6 else ["-4"] if family == 4 else []
            proc = subprocess.run(["ip", *fam, "rule", "add" if op == "rule_add" else "del", *args,
                                   "protocol", str(RTPROT_BPFROUTER)], capture_output=True, text=True)
            if proc.returncode:
                msg = " ".join(proc.stderr.split()) or f"ip rule exited with {proc.returncode}"
                raise ApiError(f"the kernel refused the rule: {msg}")
        self.policy_due = None
        self.sync_policy("rule " + ("added" if op == "rule_add" else "deleted"))
        return {"rules": self.rule_report()}

    def rule_report(self) -> dict:
        """Per family: how the fast path follows the kernel's rules (walked,
        passed and why, or the defaults), and each rule with what became of it
        there and the packets it decided; caller holds the lock."""
        out = {}
        for family, fam6, label in ((AF_INET, 0, "ipv4"), (AF_INET6, 1, "ipv6")):
            kernel = merge_own(dump_rules(family), [r for r in self.own_rules if r.family == family])
            counts = dict(self.rules.rule_totals(fam6))
            state = (self.stats.get("policy") or {}).get(label) or "default rules: local and main as one"
            rows = []
            for r in kernel:
                packets = counts.get(r)
                where = "walked" if packets is not None else "passed" if state.startswith("passed") \
                    else "left out" if counts else "default"
                rows.append({"priority": r.priority, "rule": r.text(), "fast_path": where, "packets": packets,
                             "table": table_name(r.table) if r.action == 1 else None,
                             "source": "bpfrouter (fast path only)" if r.own else proto_name(r.protocol)})
            out[label] = {"state": state, "rules": rows}
        return out

    def rule_counts(self) -> list[dict]:
        """Packets each walked rule decided, for the metrics."""
        with self.lock:
            return [{"family": label, "priority": r.priority, "rule": r.text(), "packets": n,
                     "table": table_name(r.table) if r.action == 1 else ""}
                    for fam6, label in ((0, "ipv4"), (1, "ipv6")) for r, n in self.rules.rule_totals(fam6)]

    def lb_metrics(self) -> dict:
        with self.lock:
            return self.lb.request("services", [])

    def apply_policy_due(self) -> None:
        """Compile the rules once for the events of one read (a daemon adds
        hundreds at a time)."""
        if self.policy_due:
            with self.lock:
                why, self.policy_due = self.policy_due, None
                self.sync_policy(why)

    def monitor(self) -> None:
        """Both monitor sockets are bound before the first dump, so no change
        falls between them. Route events are applied in batches, at most
        BATCH_SECONDS late. An overrun (ENOBUFS) means events were lost: resync."""
        bound, synced = threading.Event(), threading.Event()
        # pyroute2's IPRoute belongs to the thread that creates it
        threading.Thread(target=self._link_neigh_loop, args=(bound, synced), name="links", daemon=True).start()
        if not bound.wait(10):
            log.error("link/neighbor monitor did not start")
        threading.Thread(target=self._neigh_liveness_loop, name="neigh-liveness", daemon=True).start()
        first = True
        while not self.stop.is_set():
            routes = RouteMonitor(NETLINK_RCVBUF, self.wake_fd)
            try:
                if first:
                    self.full_sync("start", routes)
                else:  # the link thread runs on: links and neighbors are its own
                    self.sync_routes("monitor restart", routes)
                first = False
                self.ready.set()
                synced.set()
                self._route_loop(routes)
            except Exception:
                log.exception("route monitor failed; restarting it")
                time.sleep(0.5)
            finally:
                routes.close()
        synced.set()

    def _overrun(self, which: str, mon: RouteMonitor | None = None) -> None:
        self.stats["enobufs"] += 1
        log.warning("netlink overrun (ENOBUFS) on the %s socket: events were lost, resyncing", which)
        if mon is not None:
            self.sync_routes("route overrun", mon)
        else:
            self.sync_links_neighs(f"{which} overrun")

    def _route_loop(self, mon: RouteMonitor) -> None:
        pending: list = []
        first = 0.0
        burst = False
        while not self.stop.is_set():
            if mon.conf_changed:  # routes died, revived or changed silently
                why, mon.conf_changed = mon.conf_changed, ""
                self.request_resync(why)
            if self.fib.resync_why:  # an event the mirror cannot apply alone
                why, self.fib.resync_why = self.fib.resync_why, ""
                self.request_resync(why)
            if self.resync_why and not pending:
                self._resync_routes(mon)
                continue
            wait = max(0.0, first + BATCH_SECONDS - time.monotonic()) if pending else 0.5
            was_empty = not pending
            try:
                got = mon.read(self.decoder, pending, wait, BATCH_ROUTES)
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                pending = []  # superseded by the dump
                self._overrun("route", mon)
                continue
            if was_empty and pending:
                first = time.monotonic()
            if pending and (not got or len(pending) >= BATCH_ROUTES or time.monotonic() - first >= BATCH_SECONDS):
                if len(pending) >= BURST_ROUTES and not burst:
                    # A daemon is loading a table: the collector would scan every new
                    # route object once or more (a quarter of the mirror's cost)
                    # though the mirror holds no cycles. Pause it for the burst.
                    burst = True
                    gc.disable()
                with self.lock:
                    self.stats["events"] += len(pending)
                    self.fib.apply_batch(pending)
                pending = []
            elif burst and not pending and not got:
                burst = False  # idle again: the burst's objects join the frozen mirror
                gc.freeze()
                gc.enable()

    def _neigh_liveness_loop(self) -> None:
        """Replay the fast path's use of neighbors to the kernel (neighbors.py)."""
        while not self.stop.wait(POKE_SECONDS):
            try:
                with IPRoute() as ipr:
                    while not self.stop.wait(POKE_SECONDS):
                        with self.lock:
                            used = self.neighbors.take_used()
                        self.neighbors.poke(ipr, used)
            except Exception:
                log.exception("neighbor liveness failed; restarting it")

    def _link_neigh_loop(self, bound: threading.Event, synced: threading.Event) -> None:
        resync = False
        while not self.stop.is_set():
            ipr = IPRoute(rcvbuf=NETLINK_RCVBUF)
            try:
                ipr.bind(groups=LINK_NEIGH_GROUPS)
                bound.set()
                synced.wait()  # events queue in the socket during the first dump
                if resync:
                    self._overrun("link/neighbor")
                while not self.stop.is_set():
                    for msg in ipr.get():
                        try:
                            self.handle(msg)
                        except Exception:
                            log.exception("failed to apply %s; resyncing", msg.get("event"))
                            self.sync_links_neighs("apply error")
                    self.apply_policy_due()
            except OSError as e:
                resync = True  # a fresh socket, then a dump
                if e.errno != errno.ENOBUFS:
                    log.exception("link/neighbor monitor failed; restarting it")
                    time.sleep(0.5)
            except Exception:
                resync = True
                log.exception("link/neighbor monitor failed; restarting it")
                time.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):  # pyroute2 re-raises a pending error on close
                    ipr.close()

    # --- control API -------------------------------------------------------------
    def _kernel_route_args(self, spec: RouteSpec, ipr: IPRoute) -> dict:
        args: dict = {"dst": str(spec.prefix), "table": spec.table, "proto": RTPROT_BPFROUTER,
                      "priority": spec.metric, "type": spec.type}
        hops = []
        for nh in spec.nexthops:
            hop: dict = {}
            if nh.dev:
                found = ipr.link_lookup(ifname=nh.dev)
                if not found:
                    raise ApiError(f"unknown interface {nh.dev!r} (see `ip link`)")
                hop["oif"] = found[0]
            if nh.gateway is not None:
                hop["gateway"] = str(nh.gateway)
            hops.append(hop)
        if len(hops) == 1:
            args.update(hops[0])
        elif hops:
            args["multipath"] = hops
        return args

    def _same_slot(self, spec: RouteSpec) -> list[Route]:
        return [r for r in self.fib.routes(spec.prefix, spec.table) if r.metric == spec.metric]

    def _kernel(self, op: str, args: dict) -> None:
        """Change the kernel FIB and mirror the kernel's echo of it at once, so the
        change is in the data plane when the API call returns."""
        with IPRoute(nlm_echo=True) as ipr:
            try:
                for msg in ipr.route(op, **args):
                    self.handle(msg)
            except NetlinkError as e:
                raise ApiError(kernel_error(e, args)) from None

    def _kernel_del_dead(self, spec: RouteSpec, with_metric: bool) -> bool:
        """Delete bpfrouter's dead routes of a prefix (all next hops dead): the
        kernel holds them, the mirror does not. False if there was none."""
        args: dict = {"dst": str(spec.prefix), "table": spec.table, "proto": RTPROT_BPFROUTER}
        if with_metric:
            args["priority"] = spec.metric
        deleted = 0
        while deleted < 256:  # the kernel deletes one matching route per request
            try:
                self._kernel("del", args)
            except ApiError:
                break
            deleted += 1
        return deleted > 0

    def api(self, req: dict) -> dict:
        op = req.get("op")
        args = req.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ApiError("args must be a list of strings")
        if op == "ping" and not self.ready.is_set():
            return {"pid": os.getpid(), "ready": False, **self.stats}
        if not self.ready.wait(300):
            raise ApiError("the agent is still syncing with the kernel; try again shortly")
        if op == "ping":  # without the lock: a resync's dump holds it, and status must not wait
            return {"pid": os.getpid(), "ready": True, **self.stats, "fib": self.fib.sizes(),
                    "fib_full": self.fib.full_status(), "lb": self.lb.summary()}
        with self.lock:
            if op in ("route_add", "route_replace"):
                spec = parse_route(args, req.get("family"))
                others = [r for r in self._same_slot(spec) if r.proto != RTPROT_BPFROUTER or op == "route_add"]
                if others:
                    raise ApiError(f"route {spec.prefix} metric {spec.metric} already exists (proto "
                                   f"{proto_name(others[0].proto)})"
                                   + ("; use `route replace`" if others[0].proto == RTPROT_BPFROUTER
                                      else "; pick another metric"))
                with IPRoute() as ipr:
                    kargs = self._kernel_route_args(spec, ipr)
                self._kernel("replace" if op == "route_replace" else "add", kargs)
                fib = self.fib if spec.table in (TABLE_MAIN, 255) else self.fib.other(spec.table)
                if prefix_key(spec.prefix) in fib.left_out:
                    raise ApiError(f"route {spec.prefix} is in the kernel, but not in the fast path: its FIB is "
                                   f"full ({fib.full_error}); the fast path passes its traffic to the kernel")
                return {"prefix": str(spec.prefix)}
            if op == "route_del":
                spec = parse_route(args, req.get("family"), need_target=False)
                mine = [r for r in self.fib.routes(spec.prefix, spec.table)
                        if r.proto == RTPROT_BPFROUTER and ("metric" not in args or r.metric == spec.metric)]
                if not mine and self._kernel_del_dead(spec, "metric" in args):
                    return {"prefix": str(spec.prefix)}
                if not mine:
                    theirs = sorted({proto_name(r.proto) for r in self.fib.routes(spec.prefix, spec.table)})
                    where = (f"it comes from proto {', '.join(theirs)}: remove it with `ip route del` "
                             f"or its routing daemon") if theirs else "there is none"
                    raise ApiError(f"no bpfrouter route for {spec.prefix}; {where}")
                for r in mine:
                    self._kernel("del", {"dst": str(r.prefix), "table": r.table, "proto": r.proto,
                                         "priority": r.metric, "type": r.type.name.lower()})
                return {"prefix": str(spec.prefix)}
            if op == "rules":
                return {"families": self.rule_report()}
            if op in ("rule_add", "rule_del"):
                return self._rule_change(op, args, req.get("family"))
            if op in LB_OPS:
                return self.lb.request(op, args)
            if op == "routes":
                return {"routes": [route_json(r, self.fib.installed_route(r.prefix, r.table))
                                   for r in self.fib.routes(table=0)]}
            if op != "resync":
                raise ApiError(f"unknown operation {op!r}")
        if not self.wait_resync(self.request_resync("requested"), 300):
            raise ApiError("the route resync did not finish within 300 s")
        return {"resyncs": self.stats["resyncs"]}

    def serve(self) -> socketserver.UnixStreamServer:
        agent = self
        path = socket_path(self.name)
        path.unlink(missing_ok=True)

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline(1 << 20)
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ApiError("request must be a JSON object")
                    resp = {"ok": True, **agent.api(req)}
                except (ApiError, RouteSpecError, FibError, ServiceError) as e:
                    resp = {"ok": False, "error": str(e)}
                except json.JSONDecodeError as e:
                    resp = {"ok": False, "error": f"bad request: {e}"}
                except Exception as e:  # reported, never fatal for the agent
                    log.exception("API request failed")
                    resp = {"ok": False, "error": f"internal error: {e}"}
                self.wfile.write(json.dumps(resp).encode() + b"\n")

        server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        os.chmod(path, 0o600)
        threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
        return server

    def _warn_full_maps(self) -> None:
        """Log a warning for every map close to full, before it refuses entries."""
        try:
            with self.lock:
                sizes = {v: t.memory() for v, t in self.fib.tables.items()}
            for w in fill_warnings(map_fill(self.dp, sizes)):
                log.warning("%s", w)
        except Exception:  # a check, never fatal for the agent
            log.exception("map fill check failed")

    def _retry_left_out(self) -> None:
        """Routes have gone since a full FIB left some out: there may be room now."""
        try:
            with self.lock:
                n = self.fib.retry_left_out()
            if n:
                log.info("%d left-out routes now in the fast path", n)
        except Exception:  # a retry, never fatal for the agent
            log.exception("retrying the left-out routes failed")

    def _release_stale_capture(self) -> None:
        try:
            gone = capture.release_stale(self.dp)
        except Exception:  # a check, never fatal for the agent
            log.exception("capture lease check failed")
            return
        if gone:
            log.warning("a capture's reader stopped renewing it: capture hook removed from %s",
                        ", ".join(ifname(i) for i in gone))

    def run(self) -> None:
        gc.set_threshold(*GC_THRESHOLDS)
        pid_path(self.name).write_text(f"{os.getpid()}\n")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        with self.lock:
            self.fib.recover()
            self.lb.load()
        log.info("agent for router %s started (pid %d); recovered %d installed routes",
                 self.name, os.getpid(), len(self.fib.installed))
        server = self.serve()  # answers pings (with sync progress) during the first sync
        threading.Thread(target=self.monitor, name="netlink", daemon=True).start()
        self.policy.start()
        if self.meta.metrics:
            try:
                metrics.serve(self.name, self.meta.metrics, self.fib.full_status, self.rule_counts,
                              self.lb_metrics)
                log.info("metrics on http://%s/metrics", self.meta.metrics)
            except ValueError as e:
                log.error("%s", e)
        checked = retried = 0.0
        deletions = self.fib.deletions
        try:
            while not self.stop.wait(1.0):
                self._release_stale_capture()
                with self.lock:
                    self.lb.check_flood()
                if self.fib.left_out and self.fib.deletions != deletions \
                        and time.monotonic() - retried >= RETRY_LEFT_OUT_SECONDS:
                    retried = time.monotonic()
                    self._retry_left_out()
                    deletions = self.fib.deletions
                if time.monotonic() - checked >= FILL_CHECK_SECONDS:
                    checked = time.monotonic()
                    self._warn_full_maps()
        finally:
            server.shutdown()
            server.server_close()
            socket_path(self.name).unlink(missing_ok=True)
            pid_path(self.name).unlink(missing_ok=True)
            self.lb.stop()
            log.info("agent stopped; the data plane keeps forwarding with its last state")
            # self.lock_fd stays open until the process exits: the netlink threads may
            # still be writing a batch, and the lock must cover every write


def sync_hook(point: str) -> None:
    if SYNC_HOOK:
        subprocess.run([SYNC_HOOK, point], check=False)


def kernel_error(e: NetlinkError, args: dict) -> str:
    what = f"route {args['dst']}"
    known = {
        17: f"{what} already exists in the kernel FIB",
        101: f"{what}: gateway {args.get('gateway')} is not on a connected network (add `dev IFNAME`?)",
        19: f"{what}: no such device",
        3: f"{what}: no such route",
    }
    return known.get(e.code, f"the kernel refused {what}: {e.args[1] if len(e.args) > 1 else e}")


def route_json(r: Route, installed=None) -> dict:
    return {
        "prefix": str(r.prefix),
        "type": r.installed_type.name.lower(),
        "proto": proto_name(r.proto),
        "metric": r.metric,
        "table": table_name(r.table),
        "nexthops": [{"ifindex": nh.ifindex, "gateway": str(nh.gateway) if nh.gateway else None}
                     for nh in r.nexthops],
        "selected": installed == r,
        "passed": kernel_route_info(r.word_bits & 0xFFFFFFFF) if r.installed_type == RouteType.KERNEL else None,
    }
