"""The kernel's rules mirrored into the fast path (bpfrouter/policy/): on
every rule or link change the agent dumps both families' rules and the
ports' names and masters, compiles each family's set and writes it. A
family whose set the fast path cannot follow (policy/rules.py says why)
has its packets passed to the kernel on every port (IFACE_F_PASS_POLICY*),
counted as `policy`."""
from __future__ import annotations

import logging

from ..datapath.layout import IFACE_F_PASS_POLICY4, IFACE_F_PASS_POLICY6, IFACE_F_RULES4, IFACE_F_RULES6
from ..policy.image import RuleImage
from ..policy.rules import AF_INET, AF_INET6, Port, Rule, Unsupported, compile_rules, dump_rules, merge_own

log = logging.getLogger("bpfrouter.agent")
FAMILIES = ((AF_INET, 0, IFACE_F_PASS_POLICY4, IFACE_F_RULES4, "ipv4"),
            (AF_INET6, 1, IFACE_F_PASS_POLICY6, IFACE_F_RULES6, "ipv6"))


def read_ports(ipr, ifindexes) -> list[Port]:
    """The ports with their names and masters' names (pyroute2 IPRoute `ipr`)."""
    links = {m["index"]: m for m in ipr.link("dump")}
    names = {i: m.get_attr("IFLA_IFNAME") for i, m in links.items()}
    return [Port(i, names[i], names.get(links[i].get_attr("IFLA_MASTER") or 0)) for i in ifindexes if i in links]


def sync_rules(image: RuleImage, ports: list[Port], own: list[Rule] = ()) -> tuple[dict[int, int], dict[str, str]]:
    """Compile and write both families' rules (the kernel's, and bpfrouter's
    own among them); returns the ports' bits (passed, or walked: set after
    the rules are written, as the caller does) and, per family passed or
    walked, why or how many rules."""
    flags = {p.ifindex: 0 for p in ports}
    why: dict[str, str] = {}
    for family, fam6, bit, walk_bit, label in FAMILIES:
        try:
            compiled = compile_rules(merge_own(dump_rules(family), [r for r in own if r.family == family]), ports)
        except Exception as e:  # Unsupported, or a bug: either way the kernel routes the family
            if not isinstance(e, Unsupported):
                log.exception("compiling the %s rules failed", label)
            image.apply(fam6, None)
            for p in ports:
                flags[p.ifindex] |= bit
            why[label] = f"passed: {e}"
            continue
        image.apply(fam6, compiled)
        if compiled is not None:
            why[label] = f"{len(compiled.rules)} rules walked"
            for p in ports:
                flags[p.ifindex] |= walk_bit
    return flags, why


def own_rule_json(r: Rule) -> dict:
    return {"family": r.family, "words": ["pref", str(r.priority), *r.text().split()]}
