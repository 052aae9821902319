"""The agent's load balancer: services as the user defined them (kept in
the run directory, services.json), their health, and the lb stage's maps
(lb/image.py) kept equal to both. Every change, by the API or by a health
check, rewrites the service's table at once and is logged and counted."""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from collections import Counter, deque
from dataclasses import asdict
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..lb.health import HealthMonitor, Target
from ..lb.image import DEFAULT_SRC4, DEFAULT_SRC6, LbError, LbImage
from ..lb.maglev import MaglevError
from ..lb.service import GUE_PORT, Backend, Service, ServiceError, ServiceId, apply_options, \
    parse_backend_change, parse_service_id

log = logging.getLogger("bpfrouter.lb")
DEFAULT_NEW_CONN_LIMIT = 0      # new connections per second per CPU; 0: the table learns every flow
RECENT_CHANGES = 200


class Balancer:
    def __init__(self, dp, state_path: Path, lock: threading.RLock, on_families):
        self.image = LbImage(dp)
        self.path = state_path
        self.lock = lock
        self.on_families = on_families      # called with the IFACE_F_LB* bits after each change
        self.services: dict[ServiceId, Service] = {}
        self.settings = {"encap_source4": str(DEFAULT_SRC4), "encap_source6": str(DEFAULT_SRC6),
                         "new_conn_limit": DEFAULT_NEW_CONN_LIMIT, "gue_port": GUE_PORT}
        self.health = HealthMonitor(self._health_changed)
        self.changes: deque[dict] = deque(maxlen=RECENT_CHANGES)
        self.transitions: Counter[tuple[str, str, str]] = Counter()  # (service, backend, to) -> count
        self.flood_seen: dict[ServiceId, int] = {}  # flood_windows at the last check

    # --- state across restarts ----------------------------------------------------------------
    def load(self) -> None:
        """The saved services, written again: the same definitions and
        health (as the maps kept it) give the same tables, so the maps do
        not change and no flow moves. A service that cannot be written is
        logged and left out; a damaged file is kept aside: neither stops
        the agent, whose routing does not depend on them."""
        try:
            saved = json.loads(self.path.read_text())
        except FileNotFoundError:
            saved = {}
        except (OSError, ValueError) as e:
            aside = self.path.with_suffix(".damaged")
            self.path.replace(aside)
            log.error("services: %s is unreadable (%s), kept as %s; starting without services", self.path, e, aside)
            saved = {}
        try:
            self.settings.update(saved.get("settings", {}))
            self._write_settings()
        except (ValueError, TypeError, KeyError) as e:
            log.error("services: bad settings in %s (%s); using the defaults", self.path, e)
        for d in saved.get("services", []):
            try:
                svc = Service.from_json(d)
            except (ValueError, TypeError, KeyError) as e:
                log.error("services: left out an unreadable service in %s: %s", self.path, e)
                continue
            self.services[svc.id] = svc
        for sid in [s for s in self.image.placed if s not in self.services]:
            self.image.remove(sid)      # left by a run that did not save
        for svc in list(self.services.values()):
            for a in svc.backends:      # as the maps kept it: unhealthy stays so until checked healthy
                self.health.seed(svc.id, a, self.image.takes_connections(svc.id, a))
            try:
                self._apply(svc)
            except (ServiceError, LbError, MaglevError) as e:
                log.error("services: %s left out of the fast path: %s", svc.id, e)
                self._note(svc.id, f"left out on start: {e}")
            self._watch(svc)
        self.on_families(self.image.families())

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"settings": self.settings,
                       "services": [s.to_json() for s in sorted(self.services.values(), key=lambda s: s.id)]},
                      f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def _write_settings(self) -> None:
        self.image.set_config(ipaddress.ip_network(self.settings["encap_source4"]),
                              ipaddress.ip_network(self.settings["encap_source6"]),
                              int(self.settings["new_conn_limit"]), int(self.settings["gue_port"]))

    # --- applying -----------------------------------------------------------------------------
    def _healthy(self, svc: Service) -> dict[str, bool]:
        return {a: self.health.healthy(svc.id, a) for a in svc.backends}

    def _nat_sources(self, svc: Service) -> dict[str, str] | None:
        """NAT: the router's source address toward each backend (its route's
        preferred source, as the kernel would pick it)."""
        if svc.mode != "nat":
            return None
        out = {}
        with IPRoute() as ipr:
            for a in svc.backends:
                try:
                    src = ipr.route("get", dst=a)[0].get_attr("RTA_PREFSRC")
                except NetlinkError as e:
                    raise ServiceError(f"no route to backend {a} ({e.args[1] if len(e.args) > 1 else e}): "
                                       f"NAT needs the router's source toward it") from None
                if not src:
                    raise ServiceError(f"the route to backend {a} has no source address of the router")
                out[a] = src
        return out

    def _apply(self, svc: Service) -> None:
        p = self.image.apply(svc, self._healthy(svc), self._nat_sources(svc))
        if p.moved is not None:
            log.info("service %s: table changed, %.2f%% of flows moved", svc.id, 100 * p.moved)

    def _watch(self, svc: Service) -> None:
        port = svc.check.port or svc.id.port
        for a in svc.backends:
            self.health.watch(svc.id, a, port, svc.check)
        self.health.unwatch_except(svc.id, set(svc.backends))

    def _note(self, svc: ServiceId, what: str, **extra) -> None:
        self.changes.append({"time": time.time(), "service": str(svc), "change": what, **extra})

    def _health_changed(self, t: Target) -> None:
        state = "healthy" if t.healthy else "unhealthy"
        with self.lock:
            svc = self.services.get(t.service)
            if svc is None or t.addr not in svc.backends:
                return
            self.transitions[(str(svc.id), t.addr, state)] += 1
            self._apply(svc)
            self._note(svc.id, f"backend {t.addr} {state}", backend=t.addr, seen=t.last)
        log.warning("service %s: backend %s is %s (%s)", svc.id, t.addr, state, t.last)

    # --- the API ------------------------------------------------------------------------------
    def _service(self, words: list[str]) -> tuple[Service, list[str]]:
        sid, rest = parse_service_id(words)
        svc = self.services.get(sid)
        if svc is None:
            raise ServiceError(f"no service {sid}")
        return svc, rest

    def request(self, op: str, args: list[str]) -> dict:
        """service_add|service_del|backend_add|backend_del|backend_weight|
        backend_drain|lb_set|services; caller holds the lock. A refused
        request changes nothing."""
        try:
            return self._request(op, args)
        except (ServiceError, MaglevError, LbError) as e:
            raise ServiceError(str(e)) from None

    def _request(self, op: str, args: list[str]) -> dict:
        if op == "services":
            return {"services": self.report(), "changes": list(self.changes),
                    "transitions": [{"service": s, "backend": b, "to": to, "count": n}
                                    for (s, b, to), n in sorted(self.transitions.items())]}
        if op == "lb_set":
            return self._set(args)
        if op == "service_add":
            sid, rest = parse_service_id(args)
            if sid in self.services:
                raise ServiceError(f"service {sid} already exists")
            svc = Service(sid)
            apply_options(svc, rest)
            self.services[sid] = svc
            try:
                self._apply(svc)
            except Exception:
                self.services.pop(sid)
                self.image.remove(sid)
                raise
            self._watch(svc)
            self._note(sid, "added")
        elif op == "service_del":
            svc, rest = self._service(args)
            if rest:
                raise ServiceError(f"unexpected {' '.join(rest)!r} after the service")
            self.health.unwatch(svc.id)
            self.image.remove(svc.id)
            del self.services[svc.id]
            self._note(svc.id, "deleted")
        elif op in ("backend_add", "backend_del", "backend_weight", "backend_drain"):
            svc, rest = self._service(args)
            verb = op.split("_")[1]
            addr, weight = parse_backend_change(verb, rest)
            if verb == "add" and addr in svc.backends:
                raise ServiceError(f"backend {addr} of {svc.id} already exists; `backend weight` changes its weight")
            if verb != "add" and addr not in svc.backends:
                raise ServiceError(f"{svc.id} has no backend {addr}")
            if svc.mode == "nat" and ipaddress.ip_address(addr).version != svc.id.addr.version:
                raise ServiceError(f"mode nat translates within a family: backend {addr} is not IPv"
                                   f"{svc.id.addr.version} like {svc.id.vip}")
            before = {a: Backend(b.addr, b.weight) for a, b in svc.backends.items()}
            if weight is None:
                del svc.backends[addr]
            else:
                svc.backends[addr] = Backend(addr, weight)
            try:
                self._apply(svc)
            except Exception:
                svc.backends = before
                self._apply(svc)
                raise
            self._watch(svc)
            self._note(svc.id, f"{op.replace('_', ' ')} {addr}", backend=addr)
        else:
            raise ServiceError(f"unknown operation {op!r}")
        self._save()
        self.on_families(self.image.families())
        return {"services": self.report()}

    def _set(self, args: list[str]) -> dict:
        """lb settings: encap-source PREFIX (IPv4, IPv6), new-conn-limit N, gue-port P."""
        new = dict(self.settings)
        if len(args) % 2:
            raise ServiceError("settings are NAME VALUE pairs: encap-source PREFIX, new-conn-limit N, gue-port P")
        for name, value in zip(args[::2], args[1::2]):
            if name == "encap-source":
                try:
                    net = ipaddress.ip_network(value, strict=True)
                except ValueError as e:
                    raise ServiceError(f"encap-source {value!r}: {e}") from None
                if net.version == 4 and net.prefixlen > 30 or net.version == 6 and net.prefixlen != 96:
                    raise ServiceError("encap-source: an IPv4 prefix of /30 or shorter, or an IPv6 /96")
                new[f"encap_source{net.version}"] = str(net)
            elif name == "new-conn-limit":
                if not value.isdigit() or int(value) > 1 << 31:
                    raise ServiceError(f"new-conn-limit {value!r}: connections per second per CPU, 0 for none")
                new["new_conn_limit"] = int(value)
            elif name == "gue-port":
                if not value.isdigit() or not 1 <= int(value) <= 65535:
                    raise ServiceError(f"gue-port {value!r}: a UDP port, 1 to 65535")
                new["gue_port"] = int(value)
            else:
                raise ServiceError(f"unknown setting {name!r}: encap-source, new-conn-limit, gue-port")
        self.settings = new
        self._write_settings()
        self._save()
        return {"settings": self.settings}

    # --- what is seen -------------------------------------------------------------------------
    def report(self) -> list[dict]:
        out = []
        for sid in sorted(self.services):
            svc = self.services[sid]
            p = self.image.placed.get(sid)
            loads = self.image.loads(sid) if p else {}
            stats = self.image.service_stats(sid) if p else {}
            per_backend = self.image.backend_stats(sid) if p else {}
            weights = {a: b.weight for a, b in svc.backends.items() if a in loads}
            total = sum(weights.values())
            # Maglev's max/avg load: the busiest backend's share over what its weight asks for
            ratio = max((loads[a] * total / w for a, w in weights.items() if w), default=0.0)
            backends = []
            for a in sorted(svc.backends, key=lambda x: ipaddress.ip_address(x).packed):
                b = svc.backends[a]
                t = self.health.targets.get((sid, a))
                state = "unhealthy" if not self.health.healthy(sid, a) else "draining" if b.weight == 0 \
                    else "active"
                backends.append({"address": a, "weight": b.weight, "state": state,
                                 "health": t.last if t else "not checked", "share": loads.get(a, 0.0),
                                 **per_backend.get(a, {"packets": 0, "bytes": 0})})
            out.append({
                "service": str(sid), "proto": sid.proto, "vip": sid.vip, "port": sid.port, "mode": svc.mode,
                "encap": svc.encap if svc.mode == "dsr" else None, "table_size": p.ring_size if p else 0, "affinity": svc.affinity,
                "check": asdict(svc.check),
                "max_over_avg_load": ratio,
                "moved_last_change": p.moved if p else None,
                "stats": stats, "backends": backends,
            })
        return out

    def summary(self) -> dict:
        """For status (without the lock: from a snapshot): services by mode, backends by state."""
        services = list(self.services.items())
        states = Counter("unhealthy" if not self.health.healthy(sid, a) else "draining" if b.weight == 0
                         else "active" for sid, svc in services for a, b in list(svc.backends.items()))
        return {"services": len(services), "nat": sum(1 for _, s in services if s.mode == "nat"),
                "backends": dict(states)}

    def check_flood(self) -> None:
        """Log and note each service whose connection table stopped learning
        (the flood switch) since the last call; caller holds the lock."""
        for sid in self.services:
            if sid not in self.image.placed:
                continue
            st = self.image.service_stats(sid)
            seen = self.flood_seen.get(sid)
            self.flood_seen[sid] = st["flood_windows"]
            if seen is not None and st["flood_windows"] > seen:
                n = st["flood_windows"] - seen
                self._note(sid, f"flood switch: {n} CPU-second(s) over new-conn-limit "
                                f"{self.settings['new_conn_limit']}, flows balanced by the hash alone")
                log.warning("service %s: new connections over the limit in %d CPU-second(s); the connection "
                            "table stopped learning there", sid, n)

    def stop(self) -> None:
        self.health.stop_all()
