"""IPv4's compressed root (bpf/include/dirfib.h): the blocks the data plane
reads always decode to the root the agent keeps, through bulk loads, single
changes, in-place replaces, compactions and an agent restart, and the loaded
program, walking them in C, answers with the longest matching prefix.

The program's answers come from the program: a UDP probe per destination
through BPF_PROG_TEST_RUN (as `bpfrouter route get`), whose route type and
next hop are what the C walk of top, block, run and id read (the prefix comes
from the leaf arrays). The expected answer is the longest prefix, among the
routes the test wrote, that holds the destination: one route per prefix, so
no selection rule is involved (the kernel decides those in test_fib_bulk)."""
import ipaddress

import numpy as np
import pytest

from bpfrouter import netns
from bpfrouter.datapath import layout as lo
from bpfrouter.dirfib import EXT
from bpfrouter.fib import Fib, RouteType
from bpfrouter.grace import GRACE
from bpfrouter.labroutes import random_routes
from bpfrouter.observe import probe
from tests.kernelfib import Match, dataplane_match

from .harness import NS, kernel_route, own_datapath

GATEWAYS = ["10.2.0.2", "10.2.0.3", "10.2.0.9"]


@pytest.fixture
def dp(env):
    with own_datapath(env, "dirfib", groups=(4096, 1024)) as d:
        yield d


def assert_consistent(fib: Fib) -> None:
    """The blocks decode to the root, and no two live blocks overlap."""
    table = fib.tables[4]
    comp = table.compressed
    assert np.array_equal(comp.expand(), table.root), "the compressed root differs from the root"
    chunks, first, _ = comp.blocks()
    order = np.argsort(first)
    ends = first[order] + comp.block_words[chunks][order]
    assert (ends[:-1] <= first[order][1:]).all(), "two live blocks overlap"
    assert (comp.block_words[chunks] > 0).all()


def agent_fib(dp) -> Fib:
    """A Fib as the agent starts one: it reads the pinned maps back first, so
    the next-hop ids in use stay theirs (a Fib that does not would hand them
    out again, under the harness's fixture routes), and its first
    replace_all() withdraws what the new table lacks."""
    fib = Fib(dp)
    fib.recover()
    return fib


def longest_match(table: dict, addr: int) -> Match:
    for length in range(32, -1, -1):
        r = table.get((addr & (((1 << length) - 1) << (32 - length)) if length else 0, length))
        if r is not None:
            kind = r.installed_type.name.lower()
            if kind != "unicast":
                return Match(kind, str(r.prefix))
            nh = r.nexthops[0]
            return Match(kind, str(r.prefix), str(nh.gateway) if nh.gateway else None, nh.ifindex)
    return Match("none")


WORD_EDGES = np.array([0, 1, 63, 64, 127, 128, 191, 192, 254, 255])  # /24s where a block's bitmap word changes


def destinations(rng, fib: Fib, routes, n: int) -> list[int]:
    """n IPv4 destinations: a quarter anywhere, a quarter in the /16s that have a
    block (at random /24s and where the block's bitmap words meet), a quarter
    inside random routes, and a quarter at random routes' edges (the first and
    last address and their neighbours, where runs start and end)."""
    q = n // 4
    out = rng.integers(0, 1 << 32, q).tolist()
    chunks, _, _ = fib.tables[4].compressed.blocks()
    if len(chunks):
        c = chunks[rng.integers(len(chunks), size=q)].astype(np.int64)
        s = np.where(rng.random(q) < 0.5, rng.integers(256, size=q), WORD_EDGES[rng.integers(len(WORD_EDGES), size=q)])
        out += ((c << 16) | (s << 8) | rng.integers(256, size=q)).tolist()
    v4 = [r.prefix for r in routes if r.prefix.version == 4]
    for i in rng.integers(len(v4), size=q).tolist():
        p = v4[i]
        out.append(int(p.network_address) | int(rng.integers(p.num_addresses)))
    for i in rng.integers(len(v4), size=q).tolist():
        first, last = int(v4[i].network_address), int(v4[i].broadcast_address)
        out += [max(first - 1, 0), first, last, min(last + 1, (1 << 32) - 1)]
    # multicast and broadcast are passed before the FIB
    return [a for a in out if a >> 28 != 0xE and a != 0xFFFFFFFF]


def check_program(env, dp, fib: Fib, routes, rng, n: int = 1200, also: list[int] = ()) -> None:
    """n destinations (and those in also) through the loaded program, which
    must answer with the longest matching prefix among the routes the data
    plane holds."""
    table = {(int(r.prefix.network_address), r.prefix.prefixlen): r for r in routes}
    bad = []
    dests = destinations(rng, fib, routes, n) + list(also)
    with netns.entered(NS):
        for addr in dests:
            dst = ipaddress.IPv4Address(addr)
            want, got = longest_match(table, addr), dataplane_match(dp, dst, env.ifindex["dpt0"], env.mac["dpt0"])
            if got != want:
                bad.append(f"{dst}: program {got}, longest match {want}")
    assert not bad, f"{len(bad)} of {len(dests)} wrong, e.g. " + "; ".join(bad[:5])


def test_compressed_root_decodes_to_the_root_through_changes_and_a_restart(env, dp):
    rng = np.random.default_rng(11)
    synth = random_routes(rng, 3000, 4, GATEWAYS)
    routes = [kernel_route(env, r.prefix, r.type, r.gateway) for r in synth]
    fib = agent_fib(dp)
    fib.replace_all(routes)
    assert_consistent(fib)
    check_program(env, dp, fib, routes, rng)
    for i in rng.choice(len(routes), 300, replace=False).tolist():  # one at a time: replaced next hops
        r = routes[i]
        if r.type == RouteType.UNICAST:
            other = GATEWAYS[(GATEWAYS.index(str(r.nexthops[0].gateway)) + 1) % len(GATEWAYS)]
            routes[i] = kernel_route(env, r.prefix, "unicast", other)
            fib.update(routes[i])
    for i in sorted(rng.choice(len(routes), 300, replace=False).tolist(), reverse=True):
        fib.delete(routes.pop(i))
    assert_consistent(fib)
    check_program(env, dp, fib, routes, rng)
    root_before = fib.tables[4].root.copy()
    fib.close()

    fib = Fib(dp)  # a restarted agent: everything from the pinned maps
    try:
        assert np.array_equal(fib.tables[4].root, root_before)
        fib.recover()
        extra = [kernel_route(env, r.prefix, r.type, r.gateway) for r in random_routes(rng, 500, 4, GATEWAYS)
                 if r.prefix not in {x.prefix for x in routes}]
        for r in extra[:200]:
            fib.update(r)
        fib.replace_all(routes + extra)
        routes += extra
        assert_consistent(fib)
        check_program(env, dp, fib, routes, rng)
    finally:
        fib.close()


def test_a_replaced_route_is_rewritten_in_place(env, dp):
    """A new next hop that leaves the /16's runs as they were rewrites the
    run's entry (one store) instead of switching to a new block."""
    fib = Fib(dp)
    try:
        prefix = ipaddress.ip_network("10.99.5.0/24")
        fib.update(kernel_route(env, prefix, "unicast", "10.2.0.2"))
        comp = fib.tables[4].compressed
        chunk = int(prefix.network_address) >> 16
        top = int(comp.top[chunk])
        assert top & EXT, "10.99.0.0/16 should hold a block (three runs)"
        fib.update(kernel_route(env, prefix, "unicast", "10.2.0.3"))
        assert int(comp.top[chunk]) == top
        assert_consistent(fib)
        with netns.entered(NS):
            d = probe(dp, "10.99.5.7", env.ifindex["dpt0"], env.mac["dpt0"])
        assert (d.prefix, d.gateway) == ("10.99.5.0/24", "10.2.0.3")
        fib.delete(kernel_route(env, prefix, "unicast", "10.2.0.3"))
        assert int(comp.top[chunk]) == 0, "an empty /16 goes back to a single entry"
        assert_consistent(fib)
    finally:
        fib.close()


def test_status_memory_reports_the_compressed_root(env, dp):
    fib = Fib(dp)
    try:
        fib.update(kernel_route(env, ipaddress.ip_network("10.99.5.0/24"), "unicast", "10.2.0.2"))
        mem = fib.tables[4].memory()
        assert mem["root_blocks"] >= 1
        # the top level, plus at least one block: 36 bytes of head and three runs
        assert mem["forwarding_bytes"] >= (1 << lo.DIR_TOP_BITS) * 4 + 48
        assert mem["forwarding_bytes"] < mem["bytes"]
    finally:
        fib.close()



def test_blocks_that_grow_batch_by_batch_are_compacted(env, dp):
    """A kernel sync grows blocks batch by batch, and every replaced block is
    garbage: with halves a little over twice the live blocks, the writer must
    compact (copy the live blocks to the other half, switch each /16) many
    times, and the root stays exact and non-overlapping throughout."""
    rng = np.random.default_rng(23)
    routes = [kernel_route(env, r.prefix, r.type, r.gateway) for r in random_routes(rng, 4000, 4, GATEWAYS)]
    fib = Fib(dp)
    try:
        fib.recover()
        comp = fib.tables[4].compressed
        fib.replace_all(routes)
        live = int(comp.block_words.sum())
        fib.replace_all([])
        half = 2 * live + 64  # small halves (a test's knob): the same code path as 16 MiB ones
        comp.half, comp.base, comp.bump, comp.left_tag = half, 0, 0, {0: GRACE.mark(), half: GRACE.mark()}
        checked = 0  # compactions after which the program was asked
        for i in range(0, len(routes), 100):
            fib.apply_batch([(True, 0, r) for r in routes[i:i + 100]])
            assert_consistent(fib)
            _, first, _ = comp.blocks()
            assert ((first >= comp.base) & (first < comp.base + half)).all(), "a live block outside its half"
            if comp.compactions > checked:  # the program reads the copies, in the other half
                check_program(env, dp, fib, routes[:i + 100], rng, 400)
                checked = comp.compactions
        for i in range(0, len(routes), 400):  # new gateways, batch by batch: more garbage
            batch = [kernel_route(env, r.prefix, "unicast", GATEWAYS[i // 400 % 3]) for r in routes[i:i + 400]]
            fib.apply_batch([(True, 0x100, r) for r in batch])
            routes[i:i + 400] = batch
            assert_consistent(fib)
            if comp.compactions > checked:
                check_program(env, dp, fib, routes, rng, 400)
                checked = comp.compactions
        assert comp.compactions >= 3
        assert fib.tables[4].memory()["compactions"] == comp.compactions
        fib.close()
        fib = Fib(dp)  # a restart finds the live half
        fib.recover()
        assert_consistent(fib)
        check_program(env, dp, fib, routes, rng)
    finally:
        fib.close()


def test_single_changes_keep_the_compressed_root_exact(env, dp):
    """Route by route, as netlink events come (each change rewrites its /16's
    block or, when the runs stay, their entries in place): adds of every
    length over a covering table, next-hop replaces and withdrawals, checked
    against the root as they go."""
    rng = np.random.default_rng(23)
    base = [kernel_route(env, r.prefix, r.type, r.gateway) for r in random_routes(rng, 1500, 4, GATEWAYS)]
    fib = agent_fib(dp)
    try:
        fib.replace_all(base)
        live = {r.prefix: r for r in base}
        for step, s in enumerate(random_routes(rng, 900, 4, GATEWAYS)):
            r = kernel_route(env, s.prefix, s.type, s.gateway)
            action = step % 3
            if action == 0 or not live:
                fib.update(r)
                live[r.prefix] = r
            elif action == 1:  # a new gateway for a live prefix, where the runs may stay the same
                old = live[next(iter(live))] if step % 2 else live[list(live)[step % len(live)]]
                new = kernel_route(env, old.prefix, "unicast", GATEWAYS[step % len(GATEWAYS)])
                fib.update(new, replace=True)
                live[old.prefix] = new
            else:
                gone = live.pop(list(live)[(step * 7) % len(live)])
                fib.delete(gone)
            if step % 100 == 99:
                assert_consistent(fib)
            if step % 300 == 299:
                check_program(env, dp, fib, live.values(), rng, 400)
        assert_consistent(fib)
        check_program(env, dp, fib, live.values(), rng)
    finally:
        fib.close()


def test_the_parent_read_from_the_root_is_the_longest_covering_rule(env, dp):
    """A withdrawal finds the longest rule covering the prefix from its
    sibling's entries in the root; wherever that answers, it is the rule the
    dict probes find, and it answers for most prefixes."""
    rng = np.random.default_rng(29)
    fib = Fib(dp)
    try:
        fib.replace_all([kernel_route(env, r.prefix, r.type, r.gateway) for r in random_routes(rng, 3000, 4, GATEWAYS)])
        table = fib.tables[4]
        answered = 0
        short = [pk for pk in table.rules if 0 < pk[2] <= 24]
        for _, addr, length in short:
            found = table._root_parent(addr, length)
            if found is not None:
                assert found == table._parent(addr, length), (addr, length)
                answered += 1
        assert answered > len(short) // 2
    finally:
        fib.close()


def test_blocks_name_entries_by_id_until_the_ids_run_out(env, dp):
    """A block names its runs' entries by 8-bit ids while any of the 255 is
    free; with more distinct next hops, the rest go into raw blocks (32-bit
    entries), and forwarding still finds each route's own gateway. Once the
    routes are gone and a compaction has left the old blocks behind, their
    ids are freed and taken again."""
    rng = np.random.default_rng(31)
    gateways = [f"10.2.{1 + i // 200}.{1 + i % 200}" for i in range(300)]
    # three /24s of one gateway in each /16: a block of runs per /16
    routes = [kernel_route(env, ipaddress.ip_network(f"{20 + i // 250}.{i % 250}.{j}.0/24"), "unicast", gw)
              for i, gw in enumerate(gateways) for j in (1, 5, 9)]
    fib = agent_fib(dp)
    try:
        fib.replace_all(routes)
        comp = fib.tables[4].compressed
        assert comp.memory()["run_ids"] == lo.DIR_RUN_IDS - 1
        chunks, _, raw = comp.blocks()
        ours = {int(r.prefix.network_address) >> 16 for r in routes}
        # (a few ids stay with the withdrawn fixture routes' entries until a compaction)
        named = {RouteType.UNICAST << lo.DIR_TYPE_SHIFT | fib.nexthops.ids[r.nexthops[0]] for r in routes} & comp.ids.keys()
        assert len(named) > lo.DIR_RUN_IDS - 10
        assert sum(int(c) in ours for c in chunks[raw]) == len(gateways) - len(named), \
            "one raw block per next hop without an id"
        assert_consistent(fib)
        # each route's own gateway, from id and raw blocks alike
        check_program(env, dp, fib, routes, rng, also=[int(r.prefix.network_address) + 7 for r in routes])
        fib.replace_all(routes[:3])  # one of these /16s left
        comp._compact()
        new = [kernel_route(env, ipaddress.ip_network(f"30.{i}.2.0/24"), "unicast", gateways[-1 - i]) for i in (1, 2)]
        freed = GRACE.mark()
        fib.replace_all(routes[:3] + new)
        assert comp.memory()["run_ids"] < 20, "the ids of withdrawn next hops are freed after a compaction"
        assert GRACE.passed(freed), "and reused only after a grace period"
        # then taken again
        more = [kernel_route(env, ipaddress.ip_network(f"30.{i}.9.0/24"), "unicast", gateways[-1 - i]) for i in (1, 2)]
        fib.replace_all(routes[:3] + new + more)
        chunks, _, raw = comp.blocks()
        assert not raw[np.isin(chunks, [(30 << 8) + 1, (30 << 8) + 2])].any()
        assert_consistent(fib)
        check_program(env, dp, fib, routes[:3] + new + more, rng, 400)
    finally:
        fib.close()
