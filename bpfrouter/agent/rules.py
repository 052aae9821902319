"""Policy routing the fast path does not implement yet: which of the router's
ports, per family, the kernel's rules could route other than by the local and
main tables alone. Those ports' packets of that family are passed to the
kernel (REASON_PASS_POLICY) until policy routing lands in the fast path.

The kernel walks the rules by priority for every forwarded packet; the fast
path looks up local, then main. The two agree for a packet that matches no
rule before the first unconditional `lookup main` other than an
unconditional `lookup local`:

- Rules after that `lookup main` are reached only when main has no route or a
  throw route (`fib_rules_lookup` goes on after -EAGAIN); an unreachable or
  prohibit route, a blackhole or a route ends the walk. The fast path passes
  misses and throw routes to the kernel already, so those rules, the
  `default` table's rule at 32767 and the `default` table's routes with it,
  never change what it forwards or drops.
- Without an unconditional `lookup main`, or with `lookup local` not ahead of
  it, the fast path's order is not the kernel's: the family's every port.
- A rule with `oif` never matches a forwarded packet: `fib_rule_match`
  compares it with the flow's output interface, which is 0 on input
  (`ip_route_input_slow`, `ip6_route_input`). Unless inverted, it is skipped.
- A rule with `iif NAME` matches packets whose input device is NAME. A
  forwarded packet's input device is the port it arrived on, or that port's
  master (a VRF's l3 receive handler, a bond or a bridge make it skb->dev
  before routing): the ports named NAME and the ports whose master is NAME.
  A NAME no device has matches nothing (the kernel re-resolves names when
  devices come and go; so does this, on every link event).
- The `l3mdev` rule (which a VRF adds) matches a packet whose input device
  is enslaved to an L3 master device: ports with a master.
- Any other rule (selectors on addresses, tos, dscp, fwmark, uid, protocol,
  ports, tunnel id; actions goto, nop, blackhole, ...; `not`): it may match
  any packet of its family on any port.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..datapath.layout import IFACE_F_PASS_POLICY4, IFACE_F_PASS_POLICY6
from ..fib import TABLE_LOCAL, TABLE_MAIN

FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 0x2
AF_INET, AF_INET6 = 2, 10
NO_SUPPRESS = 0xFFFFFFFF
# attributes a rule carries without restricting what it matches or doing more than a lookup
_PLAIN_ATTRS = {"FRA_TABLE", "FRA_PRIORITY", "FRA_PROTOCOL", "FRA_UNSPEC", "FRA_PAD"}


@dataclass(frozen=True)
class Rule:
    family: int
    priority: int
    table: int
    plain: bool          # no selector, no inversion, action `lookup`, no suppression
    iif: str | None = None
    oif: str | None = None
    l3mdev: bool = False
    inverted: bool = False


def rule_from_msg(msg) -> Rule:
    """A pyroute2 fibmsg's rule."""
    attrs = dict(msg["attrs"])
    table = attrs.get("FRA_TABLE") or msg["table"]
    plain = (msg["action"] == FR_ACT_TO_TBL and not msg["flags"] & FIB_RULE_INVERT
             and not (msg["src_len"] or msg["dst_len"] or msg["tos"])
             and all(k in _PLAIN_ATTRS or (k == "FRA_SUPPRESS_PREFIXLEN" and v == NO_SUPPRESS)
                     for k, v in msg["attrs"]))
    return Rule(msg["family"], attrs.get("FRA_PRIORITY", 0), table, plain, attrs.get("FRA_IIFNAME"),
                attrs.get("FRA_OIFNAME"), bool(attrs.get("FRA_L3MDEV")), bool(msg["flags"] & FIB_RULE_INVERT))


@dataclass(frozen=True)
class Port:
    ifindex: int
    name: str
    master: str | None  # the name of its master device, if it has one


def affected_ports(rules: list[Rule], ports: list[Port]) -> tuple[set[int], str | None]:
    """The ports whose packets (of the rules' one family) the rules could route
    other than local-then-main, and why (None: none)."""
    everyone = {p.ifindex for p in ports}
    out: set[int] = set()
    why: list[str] = []
    seen_local = False
    for r in sorted(rules, key=lambda r: r.priority):  # sorted() is stable: the kernel's order
        if r.plain and r.table == TABLE_MAIN:
            if not seen_local:
                return everyone, "lookup main comes before lookup local"
            return out, "; ".join(why) or None
        if r.plain and r.table == TABLE_LOCAL:
            seen_local = True
            continue
        if r.oif and not r.inverted:
            continue  # never matches a forwarded packet
        if r.iif and not r.inverted:
            hit = {p.ifindex for p in ports if r.iif in (p.name, p.master)}
            if hit:
                out |= hit
                why.append(f"rule {r.priority} (iif {r.iif})")
        elif r.l3mdev and not r.inverted:
            hit = {p.ifindex for p in ports if p.master}
            if hit:
                out |= hit
                why.append(f"rule {r.priority} (l3mdev)")
        else:
            return everyone, f"rule {r.priority} (table {r.table})"
    return everyone, "no unconditional lookup main rule"


def rule_pass_flags(rules: list[Rule], ports: list[Port]) -> tuple[dict[int, int], dict[str, str]]:
    """IFACE_F_PASS_POLICY* bits for each port, and why, per family with any."""
    flags = {p.ifindex: 0 for p in ports}
    why: dict[str, str] = {}
    for family, bit, label in ((AF_INET, IFACE_F_PASS_POLICY4, "ipv4"), (AF_INET6, IFACE_F_PASS_POLICY6, "ipv6")):
        hit, reason = affected_ports([r for r in rules if r.family == family], ports)
        for ifindex in hit:
            flags[ifindex] |= bit
        if hit and reason:
            why[label] = reason
    return flags, why


def read_policy(ipr, ifindexes) -> tuple[dict[int, int], dict[str, str]]:
    """rule_pass_flags for the given ports, from fresh dumps of rules and links
    (pyroute2 IPRoute `ipr`, in the router's namespace)."""
    links = {m["index"]: m for m in ipr.link("dump")}
    names = {i: m.get_attr("IFLA_IFNAME") for i, m in links.items()}
    ports = [Port(i, names[i], names.get(links[i].get_attr("IFLA_MASTER") or 0))
             for i in ifindexes if i in links]
    rules = [rule_from_msg(m) for family in (AF_INET, AF_INET6) for m in ipr.get_rules(family=family)]
    return rule_pass_flags(rules, ports)
