"""IPv6's hash levels (bpf/include/hashfib6.h, bpfrouter/hashfib6.py): in a
small bucket space, single changes move keys (several per add when needed,
so a level fills past 90 % before it grows) and rebuild the levels; after
each step every key sits in one of its two buckets and holds the longest
prefix stored there, the program answers the longest match, a restarted
agent reads the same levels back, a change that does not fit is refused
whole, and a packet routed while other keys move never sees a wrong route."""
import ipaddress
import threading

import numpy as np
import pytest

from bpfrouter.fib import Fib, Nexthop, Route, RouteType
from bpfrouter.hashfib6 import SLOTS, HashTable6
from bpfrouter.observe import probe

from .harness import own_datapath

GATEWAYS = ["fd02::2", "fd02::3"]


@pytest.fixture
def dp(env):
    with own_datapath(env, "h6", groups=(4096, 8)) as d:  # 8 KiB of buckets: 64 per half, 320 slots
        yield d


def route(env, prefix: str, gateway: str = GATEWAYS[0]) -> Route:
    return Route(ipaddress.IPv6Network(prefix), RouteType.UNICAST,
                 (Nexthop(env.ifindex["dpt1"], ipaddress.ip_address(gateway)),), proto=3, metric=1024)


def assert_levels(table: HashTable6) -> None:
    """Every key in one of its buckets and its filter, with the longest prefix stored in its level."""
    base = table.cur * table.half
    live = 0
    for i, lv in enumerate(table.levels):
        shorter = table.levels[i + 1].length if i + 1 < len(table.levels) else -1
        assert base <= lv.first and lv.first + lv.nbuckets <= base + table.half
        for key, slot in lv.slots.items():
            b, s = divmod(slot, SLOTS)
            assert b in lv.buckets(key), f"/{lv.length} key {key:x} outside its buckets"
            w, bit = lv.filter_bit(key)
            assert int(table.filter[w]) >> bit & 1, f"/{lv.length} key {key:x} not in its filter"
            khi, klo = lv.split(key)
            assert int(table.keys[b, s]) == khi and (not lv.wide or int(table.keys[b, s + 1]) == klo)
            addr = key if lv.wide else key << 64
            want = next(leaf for plen in range(lv.length, shorter, -1)
                        if (leaf := table.rules.get((6, addr & ~((1 << (128 - plen)) - 1), plen))) is not None)
            assert table.leaf[b, s] == want and table.entry[b, s] == table._entry(want)
            live += 1
    assert int(np.count_nonzero(table.entry[base:base + table.half])) == live, "a slot is live without a key"
    for (_, addr, length), leaf in table.rules.items():
        lv = table._level_for(length)
        assert all(k in lv.slots for k in table._expansion(lv, addr, length)), f"{addr:x}/{length} not stored"


def assert_answers(env, dp, routes: dict[str, Route], rng, n: int = 150) -> None:
    nets = [ipaddress.IPv6Network(p) for p in routes]
    for net in rng.choice(len(nets), min(n, len(nets)), replace=False).tolist():
        net = nets[net]
        dst = net.network_address + int(rng.integers(0, min(net.num_addresses, 1 << 62)))
        want = max((p for p in nets if dst in p), key=lambda p: p.prefixlen)
        d = probe(dp, dst, env.ifindex["dpt0"], env.mac["dpt0"])
        assert d.prefix == str(want), f"{dst}: {d.prefix}, expected {want}"
        assert d.gateway == str(routes[str(want)].nexthops[0].gateway)


def test_single_changes_move_keys_and_rebuild_and_a_restart_reads_them_back(env, dp):
    rng = np.random.default_rng(5)
    fib = Fib(dp)
    table = fib.tables[6]
    routes: dict[str, Route] = {}
    # narrow levels (/32, /48) and wide ones (/96, /128), nested
    for i in range(60):
        r = route(env, f"2001:db8:{i:x}::/48" if i % 3 else f"2001:{i:x}::/32", GATEWAYS[i % 2])
        routes[str(r.prefix)] = r
    for i in range(12):
        for r in (route(env, f"2001:db8:{i:x}::{i:x}:0:0/96"),
                  route(env, f"2001:db8:{i:x}::{i:x}:0:1/128", GATEWAYS[1])):
            routes[str(r.prefix)] = r
    for r in routes.values():
        fib.update(r)
    assert table.rebuilds > 1 and table.moves > 0, "the levels should have outgrown their first buckets"
    assert_levels(table)
    assert_answers(env, dp, routes, rng)

    for p in list(routes)[::3]:  # withdrawals: covered keys fall back to the covering prefix
        fib.delete(routes.pop(p))
    for p in list(routes)[::5]:  # a new next hop, in place
        routes[p] = route(env, p, GATEWAYS[1] if str(routes[p].nexthops[0].gateway) == GATEWAYS[0] else GATEWAYS[0])
        fib.update(routes[p])
    assert_levels(table)
    assert_answers(env, dp, routes, rng)
    levels = {lv.length: dict(lv.slots) for lv in table.levels}
    fib.close()

    fib = Fib(dp)  # a restarted agent
    try:
        assert {lv.length: lv.slots for lv in fib.tables[6].levels} == levels
        assert_levels(fib.tables[6])
    finally:
        fib.close()


def test_single_adds_fill_a_level_past_90_percent_before_it_grows(env, dp):
    """A rebuild fills a level's slots to LOAD; single adds then move keys
    (several per add when needed) until the level is over 90 % full, and
    only then rebuild it with more buckets."""
    rng = np.random.default_rng(7)
    fib = Fib(dp)
    table = fib.tables[6]
    routes: dict[str, Route] = {}
    fills = []
    for i in range(240):
        r = route(env, f"2001:db8:{i:x}::/48")
        lv = table._level_for(48)
        before = (table.rebuilds, len(lv.slots) / (lv.nbuckets * SLOTS) if lv else 0.0)
        fib.update(r)
        routes[str(r.prefix)] = r
        if table.rebuilds != before[0] and i:
            fills.append(before[1])
    assert fills and min(fills) > 0.9, f"the /48 level grew at {fills}"
    assert table.moves > 0
    assert_levels(table)
    assert_answers(env, dp, routes, rng)
    fib.close()


def test_a_change_that_does_not_fit_is_refused_whole_and_left_out(env, dp):
    """Past the hash space, each new prefix is refused whole by the table
    (which keeps what it had) and left out of the fast path by the mirror:
    a packet for it finds no route and goes to the kernel."""
    rng = np.random.default_rng(6)
    fib = Fib(dp)
    table = fib.tables[6]
    harness = len(table.rules)  # the harness's own routes
    routes = [route(env, f"2001:db8:{i:x}::/48") for i in range(400)]  # 320 slots per half
    for r in routes:
        fib.update(r)
    left_out = [r for r in routes if r.pkey in fib.left_out]
    installed = {str(r.prefix): r for r in routes if r.pkey not in fib.left_out}
    assert len(installed) > 200 and left_out, "the table was to fill up"
    assert "hash levels full" in fib.full_status()["error"]
    assert len(table.rules) == harness + len(installed) and fib.sizes()["ipv6"] == len(installed)
    assert_levels(table)
    assert_answers(env, dp, installed, rng)
    for r in left_out[:20]:
        assert probe(dp, r.prefix.network_address + 1, env.ifindex["dpt0"], env.mac["dpt0"]).prefix is None
    for r in installed.values():  # room again: the left-out ones go in as their prefixes change
        fib.delete(r)
    for r in left_out:
        fib.update(r)
    assert fib.full_status() is None
    assert_answers(env, dp, {str(r.prefix): r for r in left_out}, rng)
    fib.close()


def test_packets_never_see_a_wrong_route_while_keys_move(env, dp):
    """One prefix stays while others of its level are added and removed
    (slots reused, keys moved, levels rebuilt): every packet to it gets it."""
    fib = Fib(dp)
    stay = route(env, "2001:db8:ffff::/48", GATEWAYS[1])
    fib.update(stay)
    answers: list[str | None] = []
    done = threading.Event()

    def send() -> None:
        while not done.is_set():
            d = probe(dp, "2001:db8:ffff::1", env.ifindex["dpt0"], env.mac["dpt0"])
            answers.append(d.gateway)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        table = fib.tables[6]
        before = table.rebuilds
        rnd = 0
        # at least 6 rounds, and until 200 packets ran during them, whatever the host's speed
        while rnd < 6 or len(answers) < 200:
            assert rnd < 10_000, f"only {len(answers)} packets in {rnd} rounds: the sender is stuck"
            churn = [route(env, f"2001:db8:{i % 4096:x}::/48") for i in range(rnd, 90 + rnd)]
            for r in churn:
                fib.update(r)
            for r in churn:
                fib.delete(r)
            rnd += 1
        assert table.rebuilds > before and table.moves > 0
    finally:
        done.set()
        sender.join()
        fib.close()
    assert set(answers) == {GATEWAYS[1]}, f"{sum(a != GATEWAYS[1] for a in answers)} wrong answers"
