"""Differential test of policy routing: the fast path's rule walk against the
kernel's.

Random rule sets (several hundred rules: from, to, tos, fwmark/mask, iif,
ipproto, sport and dport ranges, `not`; lookup, goto, nop, blackhole,
unreachable, prohibit; suppress_prefixlength, suppress_ifgroup of the
group one port is in) and random overlapping routes
in several tables (unicast, blackhole, unreachable, prohibit, throw) go into
the router namespace's kernel, and the agent mirrors them. For thousands of
random packets, the program's decision (what `bpfrouter route get ... iif
... mark ... tos ... ipproto ... sport ... dport` runs) must be the route,
table and next hop, or the error, that the kernel's input lookup gives
(`ip route get fibmatch` with the same fields). Which rule wins is the
kernel's answer, never a rule written here. Then a third of the rules are
deleted and the check runs again."""
import ipaddress
import json
import os
import re

import numpy as np
import pytest

from bpfrouter.lab import Lab
from bpfrouter.observe import probe
from bpfrouter import netns
from tests.conftest import BPF_SKIP, bpfrouter_cmd
from tests.kernelfib import KernelFib, Match, Packet

from .conftest import RouterProgram, wait_for

RULES = 300
ROUTES_PER_TABLE = 150
PACKETS = 2500
TABLES = [100, 101, 102, 103, 254, 253]
GATEWAYS = {4: [("10.0.1.10", "r-eth0"), ("10.0.1.11", "r-eth0"), ("10.0.2.10", "r-eth1"), ("10.0.2.11", "r-eth1")],
            6: [("fd00:1::10", "r-eth0"), ("fd00:1::11", "r-eth0"), ("fd00:2::10", "r-eth1"), ("fd00:2::11", "r-eth1")]}
# where destinations and sources come from: inside these, away from the lab's own subnets
DST_SPACE = {4: ipaddress.ip_network("198.18.0.0/15"), 6: ipaddress.ip_network("2001:db8:100::/48")}
SRC_SPACE = {4: ipaddress.ip_network("172.16.0.0/12"), 6: ipaddress.ip_network("2001:db8:200::/48")}
MASKS = [0xFF, 0xFF00, 0xFFFFFFFF]
TOS = {4: [0x04, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x1C], 6: [0x20, 0x28, 0x48, 0xB8, 0x10]}
NAMES = {"main": 254, "local": 255, "default": 253}


@pytest.fixture(scope="module")
def router():
    if BPF_SKIP:
        pytest.skip(BPF_SKIP)
    lab = Lab(f"p{os.getpid() % 10000}")
    lab.up()
    for v, gws in GATEWAYS.items():
        for i, (gw, dev) in enumerate(gws):
            lab.run("r", ["ip", "neigh", "add", gw, "lladdr", f"02:00:00:00:0{v}:{i:02x}", "dev", dev,
                          "nud", "permanent"], check=True)
    lab.run("r", ["ip", "link", "set", "r-eth1", "group", "5"], check=True)  # for suppress_ifgroup
    bpfrouter_cmd("up", "r-eth0", "r-eth1", "--name", lab.name, netns=lab.router_ns, check=True)
    yield lab
    lab.down()


def below(rng, n: int) -> int:
    """A random integer in [0, n), n up to 2**128."""
    return int.from_bytes(rng.bytes(16), "big") % n


def random_net(rng, space, lo: int, hi: int):
    plen = int(rng.integers(lo, hi + 1))
    addr = int(space.network_address) + below(rng, space.num_addresses)
    return ipaddress.ip_network((addr >> (space.max_prefixlen - plen) << (space.max_prefixlen - plen), plen))


def random_routes(rng, version: int) -> list[str]:
    lines = []
    space = DST_SPACE[version]
    for table in TABLES:
        seen = set()
        for _ in range(ROUTES_PER_TABLE):
            net = random_net(rng, space, space.prefixlen + 1, space.prefixlen + 12)
            if net in seen:
                continue
            seen.add(net)
            kind = rng.choice(["unicast"] * 6 + ["blackhole", "unreachable", "prohibit", "throw"])
            if kind == "unicast":
                gw, dev = GATEWAYS[version][int(rng.integers(len(GATEWAYS[version])))]
                lines.append(f"route add {net} via {gw} dev {dev} table {table}")
            else:
                lines.append(f"route add {kind} {net} table {table}")
    return lines


def random_rules(rng, version: int, n: int) -> list[str]:
    prefs = sorted(int(p) for p in rng.choice(np.arange(1, 32000), n, replace=False))
    lines = []
    for i, pref in enumerate(prefs):
        words = ["rule", "add", "pref", str(pref)]
        if rng.random() < 0.08:
            words.append("not")
        if rng.random() < 0.4:
            words += ["from", str(random_net(rng, SRC_SPACE[version], SRC_SPACE[version].prefixlen,
                                             SRC_SPACE[version].prefixlen + 8))]
        if rng.random() < 0.4:
            words += ["to", str(random_net(rng, DST_SPACE[version], DST_SPACE[version].prefixlen,
                                           DST_SPACE[version].prefixlen + 10))]
        if rng.random() < 0.1:
            words += ["tos", f"0x{int(rng.choice(TOS[version])):02x}"]
        if rng.random() < 0.15:
            mask = int(rng.choice(MASKS))
            words += ["fwmark", f"0x{int(rng.integers(0, 4)) * (mask & 0x0101_0101 or 1):x}/0x{mask:x}"]
        if rng.random() < 0.1:
            words += ["iif", str(rng.choice(["r-eth0", "r-eth1", "nosuch0"]))]
        if rng.random() < 0.15:
            words += ["ipproto", str(rng.choice(["tcp", "udp"]))]
            for port in ("sport", "dport"):
                if rng.random() < 0.5:
                    lo = int(rng.integers(1000, 1100))
                    hi = lo + int(rng.integers(0, 40))
                    words += [port, f"{lo}-{hi}" if hi > lo else str(lo)]
        roll = rng.random()
        later = [p for p in prefs[i + 1:i + 40]]
        if roll < 0.70:
            words += ["lookup", str(rng.choice(TABLES + [999]))]
            if rng.random() < 0.12:
                words += ["suppress_prefixlength", str(int(rng.integers(0, 28)))]
            if rng.random() < 0.15:
                words += ["suppress_ifgroup", str(rng.choice([5, 5, 6]))]
        elif roll < 0.78 and later:
            words += ["goto", str(rng.choice(later))]
        elif roll < 0.82:
            words += ["nop"]
        else:
            words += [str(rng.choice(["blackhole", "unreachable", "prohibit"]))]
        lines.append(" ".join(words))
    return lines


def batch(lab: Lab, tmp_path, version: int, lines: list[str]) -> None:
    f = tmp_path / "batch"
    f.write_text("\n".join(lines) + "\n")
    p = lab.run("r", ["ip", f"-{version}", "-batch", str(f)], timeout=120)
    failed = re.search(r"Command failed .*:(\d+)", p.stderr)
    assert p.returncode == 0, f"the kernel refused {lines[int(failed[1]) - 1] if failed else 'a change'!r}: " \
        f"{p.stderr.strip()}"


def settle(lab: Lab, prog: RouterProgram, version: int, tag: int) -> None:
    """Wait until the agent has mirrored every change made so far: a route in
    the last table and a rule, each added last, both seen by the program."""
    space = DST_SPACE[version]
    host = ipaddress.ip_address(int(space.broadcast_address) - tag)
    mark = 0x5E770000 + tag
    lab.run("r", ["ip", f"-{version}", "route", "add", "blackhole", str(host), "table", "103"], check=True)
    lab.run("r", ["ip", f"-{version}", "rule", "add", "pref", "1", "to", str(host), "fwmark",
                  f"0x{mark:x}/0xffffffff", "lookup", "103"], check=True)
    with netns.entered(lab.router_ns):
        seen = wait_for(lambda: probe(prog.dp, host, prog.iif, prog.mac, mark=mark).route_type == "blackhole",
                        timeout=60, interval=0.2)
    assert seen, "the agent did not mirror the sentinel rule and route"


def ours(prog: RouterProgram, p: Packet, ifindex_mac: dict) -> Match | str:
    """The program's decision for packet p, as a Match (or 'passed: why')."""
    d = probe(prog.dp, p.dst, p.iif, ifindex_mac[p.iif], p.src, proto=p.proto, sport=p.sport, dport=p.dport,
              tos=p.tos, mark=p.mark)
    rule = d.rule or {}
    if d.route_type is None:
        label = d.reason.label
        if label == "policy":
            return "passed"
        if label == "blackhole":
            return Match("blackhole")
        if label == "prohibit":
            return Match("prohibit")
        if label == "unreachable":  # a rule's, or no rule decided: the kernel's ENETUNREACH
            return Match("none")
        return f"reason {label}"
    name = rule.get("table")
    table = None if not name else NAMES[name] if name in NAMES else int(name)
    if d.route_type == "unicast":
        return Match("unicast", d.prefix, d.gateway, d.egress_ifindex, table)
    if d.route_type in ("blackhole", "unreachable", "prohibit"):
        return Match(d.route_type)
    return Match(d.route_type, d.prefix, table=table)


def random_packets(rng, version: int, iifs: list[int], rules: list[str], n: int) -> list[Packet]:
    marks = [0] + [int(m, 16) for line in rules for m in re.findall(r"fwmark 0x([0-9a-f]+)", line)]
    # half the addresses inside the rules' own prefixes, so that their selectors decide often
    froms = [ipaddress.ip_network(x) for line in rules for x in re.findall(r"from (\S+)", line)]
    tos_ = [ipaddress.ip_network(x) for line in rules for x in re.findall(r" to (\S+)", line)]

    def pick(space, nets):
        net = nets[int(rng.integers(len(nets)))] if nets and rng.random() < 0.5 else space
        return net.network_address + 1 + below(rng, max(net.num_addresses - 2, 1))
    out = []
    for _ in range(n):
        dst, src = pick(DST_SPACE[version], tos_), pick(SRC_SPACE[version], froms)
        proto = int(rng.choice([6, 17, 1 if version == 4 else 58]))
        tos = int(rng.choice(TOS[version] + [0, 0, int(rng.integers(0, 64)) << 2]))
        out.append(Packet(str(dst), str(src), int(rng.choice(iifs)), int(rng.choice(marks)) if rng.random() < 0.5
                          else 0, tos, proto, int(rng.integers(990, 1150)), int(rng.integers(990, 1150))))
    return out


def compare(lab, prog, version, rng, rules) -> dict:
    iifs = {}
    with netns.entered(lab.router_ns):
        for name in ("r-eth0", "r-eth1"):
            link = json.loads(lab.run("r", ["ip", "-j", "link", "show", name], check=True).stdout)[0]
            iifs[link["ifindex"]] = bytes.fromhex(link["address"].replace(":", ""))
    packets = random_packets(rng, version, list(iifs), rules, PACKETS)
    with KernelFib(lab.router_ns) as k:
        want = k.match_input(packets)
    with netns.entered(lab.router_ns):
        got = [ours(prog, p, iifs) for p in packets]
    bad = [f"{p}: kernel {w}, data plane {g}" for p, w, g in zip(packets, want, got, strict=True)
           if g != "passed" and not (isinstance(g, Match) and w.agrees(g))]
    assert not bad, f"{len(bad)} of {len(packets)} differ, e.g. " + "; ".join(bad[:4])
    kinds = {"passed": sum(g == "passed" for g in got),
             "other_tables": sum(isinstance(g, Match) and g.table not in (None, 254, 255) for g in got),
             "forwarded": sum(isinstance(g, Match) and g.kind == "unicast" for g in got)}
    return kinds


@pytest.mark.parametrize("version", [4, 6])
def test_rules_match_kernel(router, version, tmp_path):
    lab = router
    rng = np.random.default_rng(2200 + version)
    batch(lab, tmp_path, version, random_routes(rng, version))
    rules = random_rules(rng, version, RULES)
    batch(lab, tmp_path, version, rules)
    prog = RouterProgram(lab)
    try:
        settle(lab, prog, version, 1)
        status = json.loads(bpfrouter_cmd("status", "-j", "--name", lab.name, netns=lab.router_ns,
                                          check=True).stdout)
        walked = status["agent"]["policy"][f"ipv{version}"]
        assert "rules walked" in walked, f"the fast path does not walk these rules: {walked}"
        kinds = compare(lab, prog, version, rng, rules)
        # the walk decides nearly every packet itself, many of them by other tables
        print(f"IPv{version}: {kinds}")
        assert kinds["passed"] < PACKETS * 0.05, kinds
        assert kinds["other_tables"] > PACKETS * 0.02, kinds
        assert kinds["forwarded"] > PACKETS * 0.1, kinds

        # a third of the rules go; the walk follows
        gone = rng.choice(len(rules), len(rules) // 3, replace=False)
        batch(lab, tmp_path, version, [re.sub(r"^rule add", "rule del", rules[i]) for i in gone])
        rules = [r for i, r in enumerate(rules) if i not in set(gone.tolist())]
        settle(lab, prog, version, 2)
        compare(lab, prog, version, rng, rules)
    finally:
        prog.close()
