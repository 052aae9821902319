"""The FIB's bulk paths (a full load, batches of kernel events, mass
withdrawals, clearing a family) and its single-event path, against the kernel.

The routes go into a network namespace's kernel FIB, the RIB as on a router:
several per prefix (different metrics, some in the local table), added,
replaced and deleted with `ip`. A Fib mirrors what that kernel reports (its
dump and its notifications, decoded by the agent's own netlink reader), and
for random destinations, and the first and last address of every prefix with
several routes, the loaded program must take the route the kernel takes
(`ip route get fibmatch`): the kernel, not a rule written here, decides which
route wins. An agent restart
must find nothing to change."""
import numpy as np
import pytest

from bpfrouter.datapath import layout as lo
from bpfrouter.fib import Fib, RouteType, prefix_key
from bpfrouter.fibcheck import is_routable, sample_destinations
from bpfrouter.labroutes import random_routes

from tests.kernelfib import differences

from .harness import NS, KRoute, kernel_route, kernel_rib, own_datapath

GATEWAYS = {4: ["10.2.0.2", "10.2.0.3", "10.2.0.9"], 6: ["fd02::2", "fd02::3"]}
PER_FAMILY = 1500
DESTS = 400           # random destinations per family and check
EDGES = 150           # prefixes per family whose first and last address are checked too


@pytest.fixture
def dp(env):
    with own_datapath(env, "bulk", groups=(4096, 16384)) as d:
        yield d


def check(env, k, dp, fib: Fib, rng) -> None:
    """The mirror holds the kernel's prefixes, the maps hold what the mirror
    installed, and the program answers as the kernel does."""
    prefixes = k.prefixes()
    assert fib.sizes()["ipv4"] + fib.sizes()["ipv6"] == len(prefixes) == len(fib.installed)
    in_maps = {prefix_key(prefix): v for t in fib.tables.values() for prefix, v in t.installed()}
    stale = [pk for pk, r in fib.installed.items() if pk not in in_maps or in_maps[pk].type != r.installed_type or
             (r.installed_type == RouteType.UNICAST and fib.nexthops.by_id.get(in_maps[pk].nh_id) != r.nexthops[0])]
    assert not stale and len(in_maps) == len(fib.installed), f"the maps differ from the mirror for {stale[:5]}"
    dests = []
    for version in (4, 6):
        ours = [p for p in prefixes if p.version == version]
        dests += sample_destinations(rng, ours, DESTS, version)
        # the first and last address of every prefix with several routes, and of some others
        edges = [p for p in ours if prefixes[p] > 1] + [ours[i] for i in rng.permutation(len(ours))[:EDGES].tolist()]
        dests += [a for p in edges for a in (p.network_address, p.broadcast_address)]
    dests = [d for d in dests if is_routable(d)]  # no martians, multicast, link-local: the kernel drops those
    bad = differences(k.fib, dp, dests, env.ifindex["dpt0"], env.mac["dpt0"], dp_ns=NS)
    assert not bad, f"{len(bad)} of {len(dests)} differ from the kernel, e.g. " + "; ".join(bad[:5])


def covers_another(prefix, prefixes) -> bool:
    return any(p != prefix and p.version == prefix.version and p.subnet_of(prefix) for p in prefixes)


def second_routes(rng, routes: list[KRoute]) -> list[KRoute]:
    """For every 25th prefix a second route: a worse metric, a better one, or
    one in the local table (a route to the router itself, or unicast)."""
    prefixes = {r.prefix for r in routes}
    out = []
    for i, r in enumerate(routes[::25]):
        gw = GATEWAYS[r.prefix.version][-1]
        if i % 4 == 0:
            out.append(KRoute(r.prefix, "unicast", gw, metric=2000))
        elif i % 4 == 1:
            out.append(KRoute(r.prefix, "blackhole", metric=10))
        elif r.prefix.version == 6 and covers_another(r.prefix, prefixes):
            # IPv6 looks its local table up first as a whole, so a local-table route
            # shadows longer main routes; the BPF FIB does not (yet): see
            # test_fib_differential.py's xfail. Here: a worse metric instead.
            out.append(KRoute(r.prefix, "unicast", gw, metric=3000))
        elif i % 4 == 2:
            out.append(KRoute(r.prefix, "local", table="local", metric=500))  # worse than main's, still first
        else:
            out.append(KRoute(r.prefix, "unicast", gw, metric=700, table="local"))
    return out


def synth(rng, n: int, version: int) -> list[KRoute]:
    return [KRoute(s.prefix, s.type, s.gateway, metric=100) for s in random_routes(rng, n, version, GATEWAYS[version])]


def apply_singly(fib: Fib, events) -> None:
    """Notifications one by one, as the agent handles a single message."""
    for new, replace, r in events:
        if r is None:
            continue
        if new:
            fib.update(r, replace=bool(replace))
        else:
            fib.delete(r)


def test_bulk_loads_batches_withdrawals_and_restart_match_the_kernel(env, dp):
    rng = np.random.default_rng(5)
    with kernel_rib(env, "bulk") as k:
        live = [r for v in (4, 6) for r in synth(rng, PER_FAMILY, v)]
        live += second_routes(rng, live)
        k.batch([live[i].line() for i in rng.permutation(len(live)).tolist()])
        fib = Fib(dp)
        fib.recover()  # the harness's fixture routes: replaced by the kernel's
        fib.replace_all(k.dump())
        fib.apply_batch(k.events())  # queued while the dump ran, as the agent's monitor: nothing new
        check(env, k, dp, fib, rng)

        # a batch of withdrawals: a third of the routes, the best of some prefixes with several among them
        gone = set(rng.choice(len(live), len(live) // 3, replace=False).tolist())
        k.batch([live[i].line("del") for i in sorted(gone)])
        withdrawn = [r for i, r in enumerate(live) if i in gone]
        live = [r for i, r in enumerate(live) if i not in gone]
        fib.apply_batch(k.events())
        check(env, k, dp, fib, rng)

        # a batch of announcements: new gateways for main-table routes (NLM_F_REPLACE), withdrawn ones back
        replaced = [r for r in live if r.table == "main" and r.kind == "unicast"][::3]
        lines = []
        for r in replaced:
            gws = GATEWAYS[r.prefix.version]
            new = KRoute(r.prefix, "unicast", gws[(gws.index(r.gateway) + 1) % len(gws)], r.metric, r.table)
            lines.append(new.line("replace"))
            live[live.index(r)] = new
        back = withdrawn[: len(withdrawn) // 2]
        lines += [r.line() for r in back]
        live += back
        k.batch(lines)
        fib.apply_batch(k.events())
        check(env, k, dp, fib, rng)

        # one at a time, as single messages arrive
        for r in live[:40]:
            k.batch([r.line("del")])
            apply_singly(fib, k.events())
        live = live[40:]
        check(env, k, dp, fib, rng)
        fib.close()

        fib = Fib(dp)  # a restarted agent: what the maps hold matches the kernel, nothing to write
        fib.recover()
        assert fib.replace_all(k.dump()) == 0
        check(env, k, dp, fib, rng)

        # withdraw all but a few prefixes, then everything, the gateways' subnets last (both families cleared)
        keep = {r.prefix for r in live[:10]}
        k.batch([r.line("del") for r in live if r.prefix not in keep])
        fib.apply_batch(k.events())
        check(env, k, dp, fib, rng)
        k.batch([r.line("del") for r in live if r.prefix in keep] +
                ["route del 10.2.0.0/24 dev dpt1", "route del fd02::/64 dev dpt1"])
        fib.apply_batch(k.events())
        assert k.prefixes() == {}
        check(env, k, dp, fib, rng)
        assert fib.tables[4].memory()["groups_used"] == 0 and fib.tables[6].memory()["slots_used"] == 0

        # and a new table loaded into the emptied structure
        live = [r for v in (4, 6) for r in synth(rng, PER_FAMILY, v)]
        k.batch(["route add 10.2.0.0/24 dev dpt1", "route add fd02::/64 dev dpt1"] + [r.line() for r in live])
        fib.apply_batch(k.events())
        check(env, k, dp, fib, rng)
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
def test_single_events_match_the_kernel(env, impl):
    """One route per event, as the agent applies single netlink messages (the
    single-prefix path): new prefixes, replaced gateways, a second route for a
    prefix, withdrawals of the best and of the last route; the next hops'
    references follow."""
    rng = np.random.default_rng(11)
    with own_datapath(env, "single", impl, groups=(4096, 16384)) as dp, kernel_rib(env, "single") as k:
        table = [r for v in (4, 6) for r in synth(rng, 400, v)]
        k.batch([r.line() for r in table[:200] + table[400:600]])
        fib = Fib(dp)
        fib.recover()
        fib.replace_all(k.dump())
        k.events()  # the dump's routes
        k.batch([r.line() for r in table[200:400] + table[600:]])  # new prefixes
        apply_singly(fib, k.events())
        lines = []
        for i, r in enumerate(table[::7]):
            gws = GATEWAYS[r.prefix.version]
            gw = gws[i % len(gws)]
            if i % 3 == 0:  # NLM_F_REPLACE: a new gateway in the route's place
                lines.append(KRoute(r.prefix, "unicast", gw, r.metric).line("replace"))
            elif i % 3 == 1:  # a second route, worse, then the best withdrawn
                lines += [KRoute(r.prefix, "unicast", gw, 4000).line(), r.line("del")]
            else:  # the prefix's last route withdrawn
                lines.append(r.line("del"))
        k.batch(lines)
        apply_singly(fib, k.events())
        check(env, k, dp, fib, rng)
        unicast = sum(r.installed_type == RouteType.UNICAST for r in fib.installed.values())
        assert sum(fib.nexthops.refs.values()) == unicast
        fib.close()
