"""Health checks: the agent probes each backend of each service (TCP
connect, HTTP GET with an expected status, UDP request and reply, or an
external command) every `interval`; `rise` successes in a row make a
backend healthy, `fall` failures unhealthy. A change is reported through
a callback (the agent rewrites the service's table, logs it, counts it).

One thread per probe target, so a slow backend never delays another's
verdict: the detection time stays interval x fall plus one timeout."""
from __future__ import annotations

import http.client
import logging
import os
import shlex
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .service import Check

log = logging.getLogger("bpfrouter.lb")


def probe(check: Check, addr: str, port: int) -> tuple[bool, str]:
    """One probe: (healthy, what was seen)."""
    try:
        if check.kind == "tcp":
            with socket.create_connection((addr, port), timeout=check.timeout):
                return True, "connected"
        if check.kind == "http":
            conn = http.client.HTTPConnection(addr, port, timeout=check.timeout)
            try:
                conn.request("GET", check.path, headers={"User-Agent": "bpfrouter-health"})
                resp = conn.getresponse()
                resp.read()     # all of it: closing with unread bytes would reset the connection
                status = resp.status
            finally:
                conn.close()
            return status == check.status, f"HTTP {status}"
        if check.kind == "udp":
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.settimeout(check.timeout)
                s.sendto(check.payload.encode(), (addr, port))
                reply = s.recv(65535)
            ok = check.expect.encode() in reply
            return ok, "reply" if ok else "unexpected reply"
        if check.kind == "exec":
            env = {**os.environ, "BACKEND": addr, "PORT": str(port)}
            rc = subprocess.run(shlex.split(check.command), env=env, timeout=check.timeout,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
            return rc == 0, f"exit {rc}"
        return True, "no check"
    except subprocess.TimeoutExpired:
        return False, "timed out"
    except OSError as e:
        return False, e.strerror or type(e).__name__
    except (http.client.HTTPException, ValueError) as e:
        return False, type(e).__name__


@dataclass
class Target:
    service: object             # ServiceId
    addr: str
    port: int
    check: Check
    healthy: bool = True        # a backend starts healthy: no flow waits for the first probes
    streak: int = 0             # probes in a row that disagree with `healthy`
    last: str = ""
    changed_at: float = 0.0


class HealthMonitor:
    def __init__(self, on_change: Callable[[Target], None]):
        self.on_change = on_change
        self.targets: dict[tuple, Target] = {}
        self.threads: dict[tuple, threading.Event] = {}
        self.seeded: dict[tuple, bool] = {}     # the health a backend starts its checks with
        self.lock = threading.Lock()

    def seed(self, service, addr: str, healthy: bool) -> None:
        """Start (service, addr)'s checks from `healthy` (what an earlier
        agent found), not from healthy."""
        self.seeded[(service, addr)] = healthy

    def watch(self, service, addr: str, port: int, check: Check) -> None:
        """Probe (service, addr) with `check`; re-watching with another check restarts it."""
        key = (service, addr)
        with self.lock:
            t = self.targets.get(key)
            if t and t.check == check and t.port == port:
                return
            self._stop(key)
            if check.kind == "none":
                self.targets.pop(key, None)
                return
            t = Target(service, addr, port, check, healthy=t.healthy if t else self.seeded.pop(key, True))
            self.targets[key] = t
            stop = self.threads[key] = threading.Event()
        threading.Thread(target=self._run, args=(t, stop), name=f"health {addr}", daemon=True).start()

    def unwatch(self, service) -> None:
        """Stop probing every backend of the service."""
        self.unwatch_except(service, set())

    def unwatch_except(self, service, addrs: set[str]) -> None:
        """Stop probing the service's backends not in `addrs`."""
        with self.lock:
            for key in [k for k in self.targets if k[0] == service and k[1] not in addrs]:
                self._stop(key)
                self.targets.pop(key, None)

    def _stop(self, key) -> None:
        ev = self.threads.pop(key, None)
        if ev:
            ev.set()

    def healthy(self, service, addr: str) -> bool:
        t = self.targets.get((service, addr))
        return t.healthy if t else self.seeded.get((service, addr), True)

    def stop_all(self) -> None:
        with self.lock:
            for key in list(self.threads):
                self._stop(key)

    def _run(self, t: Target, stop: threading.Event) -> None:
        c = t.check
        while not stop.is_set():
            started = time.monotonic()
            ok, seen = probe(c, t.addr, t.port)
            if stop.is_set():
                return
            t.last = seen
            if ok == t.healthy:
                t.streak = 0
            else:
                t.streak += 1
                if t.streak >= (c.rise if ok else c.fall):
                    t.healthy, t.streak, t.changed_at = ok, 0, time.time()
                    try:
                        self.on_change(t)
                    except Exception:  # not applied: the next probe tries again
                        t.healthy = not ok
                        log.exception("applying a health change failed")
            stop.wait(max(0.0, c.interval - (time.monotonic() - started)))
