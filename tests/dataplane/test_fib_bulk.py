"""The FIB's bulk paths (a full load, batches of kernel events, mass
withdrawals, clearing a family) against a longest-prefix match over the
RIB's best routes, for random destinations through the loaded program.

Both families share one Fib, some prefixes have several kernel routes (the
lowest metric wins, the local table before the main one), and an agent
restart must find nothing to change."""
import numpy as np
import pytest

from bpfrouter.datapath import layout as lo
from bpfrouter.fib import TABLE_LOCAL, Fib, Route, RouteType, prefix_key
from bpfrouter.fibcheck import sample_destinations
from bpfrouter.labroutes import random_routes
from bpfrouter.observe import probe

from .harness import kernel_route, own_datapath

GATEWAYS = {4: ["10.2.0.2", "10.2.0.3", "10.2.0.9"], 6: ["fd02::2", "fd02::3"]}
PER_FAMILY = 1500
DESTS = 400


@pytest.fixture
def dp(env):
    with own_datapath(env, "bulk", groups=(4096, 16384)) as d:
        yield d


def expected_best(rib: dict) -> dict:
    """The best route per prefix: local table first, then the lowest metric."""
    return {pk: min(routes.values(), key=lambda r: (r.table != TABLE_LOCAL, r.metric)) for pk, routes in rib.items()
            if routes}


def longest_match(best: dict, addr) -> Route | None:
    width = 32 if addr.version == 4 else 128
    raw = int(addr)
    for length in range(width, -1, -1):
        net = raw & (((1 << length) - 1) << (width - length)) if length else 0
        r = best.get((addr.version, net, length))
        if r is not None:
            return r
    return None


def check(env, dp, fib: Fib, rib: dict, rng) -> None:
    best = expected_best(rib)
    assert fib.sizes()["ipv4"] + fib.sizes()["ipv6"] == len(best)
    wrong = [pk for pk, r in best.items() if not r.same_forwarding(fib.installed.get(pk))]
    assert not wrong and len(fib.installed) == len(best), f"installed differs for {wrong[:5]}"
    in_maps = {prefix_key(prefix): v for t in fib.tables.values() for prefix, v in t.installed()}
    stale = [pk for pk, r in best.items() if pk not in in_maps or in_maps[pk].type != r.installed_type or
             (r.installed_type == RouteType.UNICAST and
              fib.nexthops.by_id.get(in_maps[pk].nh_id) != r.nexthops[0])]
    assert not stale and len(in_maps) == len(best), f"the maps differ for {stale[:5]}"
    bad = []
    for version in (4, 6):
        prefixes = [Route.from_key(pk, RouteType.UNICAST, (), 0, 0, 254).prefix for pk in best if pk[0] == version]
        for dst in sample_destinations(rng, prefixes, DESTS, version):
            want = longest_match(best, dst)
            d = probe(dp, dst, env.ifindex["dpt0"], env.mac["dpt0"])
            got = (d.prefix, d.route_type, d.gateway)
            exp = (None, None, None) if want is None else (
                str(want.prefix), want.installed_type.name.lower(),
                str(want.nexthops[0].gateway) if want.installed_type == RouteType.UNICAST else None)
            if got != exp:
                bad.append(f"{dst}: data plane {got}, expected {exp}")
    assert not bad, f"{len(bad)} wrong answers, e.g. " + "; ".join(bad[:5])


def test_bulk_loads_batches_withdrawals_and_restart_match_the_rib(env, dp):
    rng = np.random.default_rng(5)
    rib: dict = {}

    def add(r: Route) -> None:
        rib.setdefault(r.pkey, {})[r.key] = r

    for version in (4, 6):
        for s in random_routes(rng, PER_FAMILY, version, GATEWAYS[version]):
            add(kernel_route(env, s.prefix, s.type, s.gateway))
    several = list(rib)[::25]  # these get a second route: a worse metric, or the local table
    for i, pk in enumerate(several):
        first = next(iter(rib[pk].values()))
        gw = GATEWAYS[pk[0]][-1]
        add(kernel_route(env, first.prefix, "unicast", gw, metric=2000) if i % 2 else
            Route(first.prefix, RouteType.LOCAL, (), proto=2, metric=0, table=TABLE_LOCAL))

    fib = Fib(dp)
    fib.recover()  # the harness's fixture routes: replaced by this table
    fib.replace_all([r for routes in rib.values() for r in routes.values()])
    check(env, dp, fib, rib, rng)

    # a batch of withdrawals: a third of the routes, including the best of some prefixes with two
    keys = list(rib)
    events = []
    for i in rng.choice(len(keys), len(keys) // 3, replace=False).tolist():
        r = next(iter(rib[keys[i]].values()))
        events.append((False, 0, r))
        del rib[keys[i]][r.key]
    fib.apply_batch(events)
    check(env, dp, fib, rib, rng)

    # a batch of announcements: new gateways (NLM_F_REPLACE) and withdrawn prefixes back
    events = []
    for pk in rng.permutation(np.array(keys, dtype=object))[: len(keys) // 2].tolist():
        pk = tuple(pk)
        prefix = Route.from_key(pk, RouteType.UNICAST, (), 0, 0, 254).prefix
        r = kernel_route(env, prefix, "unicast", GATEWAYS[pk[0]][int(rng.integers(len(GATEWAYS[pk[0]])))])
        for k in [k for k in rib.get(pk, {}) if k[:2] == r.key[:2]]:
            del rib[pk][k]
        add(r)
        events.append((True, 0x100, r))
    fib.apply_batch(events)
    check(env, dp, fib, rib, rng)

    # one at a time, as the API's echo arrives
    for pk in list(rib)[:40]:
        for r in list(rib[pk].values())[:1]:
            fib.delete(r)
            del rib[pk][r.key]
    check(env, dp, fib, rib, rng)
    fib.close()

    fib = Fib(dp)  # a restarted agent: what the maps hold matches the kernel, nothing to write
    fib.recover()
    assert fib.replace_all([r for routes in rib.values() for r in routes.values()]) == 0
    check(env, dp, fib, rib, rng)

    # withdraw all but a few prefixes, then everything (a family cleared at once)
    live = [r for routes in rib.values() for r in routes.values()]
    keep = {r.pkey for r in live[:10]}
    fib.apply_batch([(False, 0, r) for r in live if r.pkey not in keep])
    for pk in list(rib):
        if pk not in keep:
            del rib[pk]
    check(env, dp, fib, rib, rng)
    fib.apply_batch([(False, 0, r) for r in live if r.pkey in keep])
    rib.clear()
    check(env, dp, fib, rib, rng)
    assert fib.tables[4].memory()["groups_used"] == 0 and fib.tables[6].memory()["slots_used"] == 0

    # and the same table loaded again into the emptied structure
    for version in (4, 6):
        for s in random_routes(rng, PER_FAMILY, version, GATEWAYS[version]):
            add(kernel_route(env, s.prefix, s.type, s.gateway))
    fib.apply_batch([(True, 0, r) for routes in rib.values() for r in routes.values()])
    check(env, dp, fib, rib, rng)
    fib.close()


def test_a_restarted_agent_reads_the_lpm_trie_back(env):
    """--fib-impl lpm: recover() finds every route (prefix, type, next hop and
    its references), so a resync with the same table writes nothing and
    releases no next hop still in use."""
    rng = np.random.default_rng(9)
    with own_datapath(env, "lpmrestart", lo.FibImpl.LPM) as dp:
        routes = [kernel_route(env, s.prefix, s.type, s.gateway) for version in (4, 6)
                  for s in random_routes(rng, 300, version, GATEWAYS[version])]
        fib = Fib(dp)
        fib.recover()
        fib.replace_all(routes)
        fib.close()
        fib = Fib(dp)
        fib.recover()
        assert {pk: (r.installed_type, r.nexthops, r.proto) for pk, r in fib.installed.items()} == \
            {r.pkey: (r.installed_type, r.nexthops, r.proto) for r in routes}
        refs = {nid: n for nid, n in fib.nexthops.refs.items() if n}
        assert sum(refs.values()) == sum(r.installed_type == RouteType.UNICAST for r in routes)
        assert fib.replace_all(routes) == 0
        assert set(fib.nexthops.by_id.values()) == {r.nexthops[0] for r in routes if r.nexthops}
        fib.close()


@pytest.mark.parametrize("impl", [lo.FibImpl.DIR, lo.FibImpl.LPM])
def test_single_events_match_the_rib(env, impl):
    """One route per event, as the agent applies most netlink messages (the
    single-prefix path): new prefixes, replaced gateways, a second route for a
    prefix, withdrawals of the best and of the last route; the next hops'
    references follow."""
    rng = np.random.default_rng(11)
    with own_datapath(env, "single", impl, groups=(4096, 16384)) as dp:
        rib: dict = {}
        fib = Fib(dp)
        fib.recover()
        table = [kernel_route(env, s.prefix, s.type, s.gateway) for version in (4, 6)
                 for s in random_routes(rng, 400, version, GATEWAYS[version])]
        fib.replace_all(table[:200] + table[400:600])
        for r in table[:200] + table[400:600]:
            rib.setdefault(r.pkey, {})[r.key] = r
        for r in table[200:400] + table[600:]:  # new prefixes
            fib.update(r)
            rib.setdefault(r.pkey, {})[r.key] = r
        for i, pk in enumerate(list(rib)[::7]):
            first = next(iter(rib[pk].values()))
            gw = GATEWAYS[pk[0]][i % len(GATEWAYS[pk[0]])]
            if i % 3 == 0:  # NLM_F_REPLACE: a new gateway in the route's place
                r = kernel_route(env, first.prefix, "unicast", gw)
                fib.update(r, replace=True)
                rib[pk] = {r.key: r}
            elif i % 3 == 1:  # a second route, worse, then the best withdrawn
                r = kernel_route(env, first.prefix, "unicast", gw, metric=4000)
                fib.update(r)
                fib.delete(first)
                rib[pk] = {r.key: r}
            else:  # the prefix's last route withdrawn
                fib.delete(first)
                del rib[pk]
        check(env, dp, fib, rib, rng)
        unicast = sum(r.installed_type == RouteType.UNICAST for r in fib.installed.values())
        assert sum(fib.nexthops.refs.values()) == unicast
        fib.close()
