"""Services as the user writes them: `tcp 10.0.0.100:80` (a protocol, a
VIP and a port, 0 or none: every port), backends with weights, a health
check; parsed from iproute2-style words, kept as JSON in the run
directory. Errors are one line (ServiceError)."""
from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import asdict, dataclass, field

from . import maglev

PROTOS = {"tcp": 6, "udp": 17}
CHECK_KINDS = ("tcp", "http", "udp", "exec", "none")
MODES = ("dsr", "nat")
ENCAPS = ("ipip", "gue")
GUE_PORT = 6080                 # the GUE services' outer UDP port unless set (Katran's)
MAX_WEIGHT = 65535
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ServiceError(ValueError):
    pass


def parse_addr(text: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ServiceError(f"{what} {text!r} is not an IP address") from None


@dataclass(frozen=True, order=True)
class ServiceId:
    proto: str          # tcp or udp
    vip: str
    port: int           # 0: every port

    @property
    def addr(self) -> IPAddress:
        return ipaddress.ip_address(self.vip)

    def __str__(self) -> str:
        host = f"[{self.vip}]" if ":" in self.vip else self.vip
        return f"{self.proto} {host}:{self.port}" if self.port else f"{self.proto} {host}"


def parse_service_id(words: list[str]) -> tuple[ServiceId, list[str]]:
    """`tcp 10.0.0.100:80`, `udp [2001:db8::1]:53`, `tcp 10.0.0.100` (every
    port); returns the id and the words after it."""
    if len(words) < 2:
        raise ServiceError("a service is PROTO VIP[:PORT], e.g. `tcp 10.0.0.100:80` or `udp [2001:db8::1]:53`")
    proto, spec = words[0].lower(), words[1]
    if proto not in PROTOS:
        raise ServiceError(f"protocol {words[0]!r}: tcp or udp")
    port = 0
    if spec.startswith("["):
        m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", spec)
        if not m:
            raise ServiceError(f"service address {spec!r}: write [IPv6]:PORT")
        host, port_text = m.group(1), m.group(2)
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
    else:
        host, port_text = spec, None
    addr = parse_addr(host, "VIP")
    if port_text is not None:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ServiceError(f"port {port_text!r}: 0 to 65535")
        port = int(port_text)
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
        raise ServiceError(f"VIP {addr} must be a unicast address")
    return ServiceId(proto, str(addr), port), words[2:]


@dataclass
class Check:
    kind: str = "tcp"           # tcp connect, http GET, udp request/reply, exec a command, none
    port: int = 0               # 0: the service's port
    path: str = "/"             # http
    status: int = 200           # http: the status expected
    payload: str = ""           # udp: what is sent
    expect: str = ""            # udp: what the reply must contain ("" any reply)
    command: str = ""           # exec: run with BACKEND and PORT in its environment; exit 0 is healthy
    interval: float = 1.0       # seconds between probes
    timeout: float = 1.0
    rise: int = 2               # successes in a row to become healthy
    fall: int = 3               # failures in a row to become unhealthy


@dataclass
class Backend:
    addr: str
    weight: int = 1             # 0: draining (established connections stay, no new ones)


@dataclass
class Service:
    id: ServiceId
    backends: dict[str, Backend] = field(default_factory=dict)
    table_size: int | None = None   # None: chosen from the backend count (maglev.table_size)
    affinity: bool = True           # the connection table keeps flows on their backend
    check: Check = field(default_factory=Check)
    mode: str = "dsr"               # dsr: encapsulated, the backend answers the client; nat: translated both ways
    encap: str = "ipip"             # dsr's encapsulation: ipip (IPIP, IPv6-in-IPv6, ...) or gue (the same in UDP)

    def to_json(self) -> dict:
        return {"proto": self.id.proto, "vip": self.id.vip, "port": self.id.port,
                "backends": [asdict(b) for b in self.backends.values()], "table_size": self.table_size,
                "affinity": self.affinity, "check": asdict(self.check), "mode": self.mode, "encap": self.encap}

    @classmethod
    def from_json(cls, d: dict) -> "Service":
        return cls(ServiceId(d["proto"], d["vip"], d["port"]),
                   {b["addr"]: Backend(**b) for b in d["backends"]}, d.get("table_size"),
                   d.get("affinity", True), Check(**d.get("check", {})), d.get("mode", "dsr"),
                   d.get("encap", "ipip"))


def _number(words: list[str], i: int, name: str, lo: float, hi: float, kind=int):
    if i + 1 >= len(words):
        raise ServiceError(f"`{name}` needs a value")
    try:
        v = kind(words[i + 1])
    except ValueError:
        raise ServiceError(f"{name} {words[i + 1]!r} is not a number") from None
    if not lo <= v <= hi:
        raise ServiceError(f"{name} {v}: {lo} to {hi}")
    return v


def _value(words: list[str], i: int, name: str) -> str:
    if i + 1 >= len(words):
        raise ServiceError(f"`{name}` needs a value")
    return words[i + 1]


def apply_options(svc: Service, words: list[str]) -> None:
    """Service options: mode dsr|nat, encap ipip|gue (dsr), table-size N, no-affinity | affinity, and the health
    check: check tcp|http|udp|exec|none, check-port P, path P, status N,
    payload S, expect S, command 'CMD ...', interval S, timeout S, rise N, fall N."""
    c = svc.check
    i = 0
    while i < len(words):
        w = words[i]
        if w == "table-size":
            try:
                svc.table_size = maglev.check_size(_number(words, i, w, 2, 1 << 22))
            except maglev.MaglevError as e:
                raise ServiceError(str(e)) from None
        elif w == "mode":
            svc.mode = _value(words, i, w)
            if svc.mode not in MODES:
                raise ServiceError(f"mode {svc.mode!r}: dsr (encapsulation) or nat")
        elif w == "encap":
            svc.encap = _value(words, i, w)
            if svc.encap not in ENCAPS:
                raise ServiceError(f"encap {svc.encap!r}: ipip (IP in IP) or gue (IP in UDP)")
        elif w in ("no-affinity", "affinity"):
            svc.affinity = w == "affinity"
            i += 1
            continue
        elif w == "check":
            kind = _value(words, i, w)
            if kind not in CHECK_KINDS:
                raise ServiceError(f"check {kind!r}: one of {', '.join(CHECK_KINDS)}")
            c.kind = kind
        elif w == "check-port":
            c.port = _number(words, i, w, 1, 65535)
        elif w == "path":
            c.path = _value(words, i, w)
            if not c.path.startswith("/"):
                raise ServiceError(f"path {c.path!r} must start with /")
        elif w == "status":
            c.status = _number(words, i, w, 100, 599)
        elif w == "payload":
            c.payload = _value(words, i, w)
        elif w == "expect":
            c.expect = _value(words, i, w)
        elif w == "command":
            c.command = _value(words, i, w)
            try:
                if not shlex.split(c.command):
                    raise ValueError
            except ValueError:
                raise ServiceError(f"command {c.command!r} is not a command line") from None
        elif w == "interval":
            c.interval = _number(words, i, w, 0.05, 3600, float)
        elif w == "timeout":
            c.timeout = _number(words, i, w, 0.05, 60, float)
        elif w == "rise":
            c.rise = _number(words, i, w, 1, 100)
        elif w == "fall":
            c.fall = _number(words, i, w, 1, 100)
        else:
            raise ServiceError(f"unknown service option {w!r}")
        i += 2
    if svc.mode == "nat" and svc.encap != "ipip":
        raise ServiceError("encap is dsr's: a nat service translates, it does not encapsulate")
    if svc.mode == "nat" and not svc.affinity:
        raise ServiceError("mode nat keeps each flow's translation in the connection table: no-affinity cannot be")
    if c.kind == "exec" and not c.command:
        raise ServiceError("check exec needs `command 'CMD ...'`")
    if c.kind == "udp" and not c.payload:
        raise ServiceError("check udp needs `payload TEXT` (and optionally `expect TEXT`)")
    if svc.id.port == 0 and c.kind in ("tcp", "http", "udp") and not c.port:
        raise ServiceError(f"a service on every port needs `check-port P` for its {c.kind} check")
    if svc.id.proto == "udp" and c.kind in ("tcp", "http") and "check" not in words:
        c.kind = "udp" if c.payload else "none"
    if svc.mode == "nat" and c.kind == "none":
        raise ServiceError("mode nat needs a health check (its probes also keep each backend's neighbor "
                           "resolved, which translated packets cannot leave to the kernel)")


def parse_weight(words: list[str]) -> int:
    """`weight N` (default 1) and nothing else."""
    if not words:
        return 1
    if words[0] != "weight" or len(words) != 2:
        raise ServiceError(f"unexpected {' '.join(words)!r}: only `weight N` may follow the backend")
    return _number(words, 0, "weight", 0, MAX_WEIGHT)


BACKEND_USAGE = {"add": "ADDR [weight N]", "del": "ADDR", "weight": "ADDR N", "drain": "ADDR"}


def parse_backend_change(op: str, words: list[str]) -> tuple[str, int | None]:
    """`backend OP` words after the service: the backend's address and its
    new weight (None: removed), all checked before anything changes."""
    if not words:
        raise ServiceError(f"which backend? `backend {op} SERVICE {BACKEND_USAGE[op]}`")
    addr = str(parse_addr(words[0], "backend"))
    rest = words[1:]
    if op == "add":
        return addr, parse_weight(rest)
    if op == "weight":
        if len(rest) != 1:
            raise ServiceError(f"`backend weight SERVICE {BACKEND_USAGE['weight']}`")
        return addr, parse_weight(["weight", rest[0]])
    if rest:
        raise ServiceError(f"unexpected {' '.join(rest)!r} after the backend: `backend {op} SERVICE ADDR`")
    return addr, 0 if op == "drain" else None
