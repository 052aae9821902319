"""`route get` runs a probe through the live program: it must report the
decision without counting the packet."""
from bpfrouter import netns
from bpfrouter.observe import probe, read_counters

from .harness import MAC_GW, NS


def _probe(env, mode, dst, **kw):
    dp = env.dps[mode]
    with netns.entered(NS):
        before = read_counters(dp)
        d = probe(dp, dst, env.ifindex["dpt0"], env.mac["dpt0"], **kw)
        assert read_counters(dp) == before, "a probe must not be counted"
    return d


def test_probe_forwarded_bpf(env):
    d = _probe(env, "bpf", "10.20.9.9")
    assert (d.verdict, d.reason.name, d.action) == ("redirect", "FWD_IPV4", "redirect")
    assert d.prefix == "10.20.0.0/16" and d.proto == "bpfrouter" and d.route_type == "unicast"
    assert d.gateway == "10.2.0.2" and d.neigh_found and d.dmac == MAC_GW
    assert d.egress_ifindex == env.ifindex["dpt1"] and d.ttl_out == 63


def test_probe_forwarded_kernel(env):
    d = _probe(env, "kernel", "10.20.9.9")
    assert d.reason.name == "FWD_IPV4" and d.dmac == MAC_GW and d.egress_ifindex == env.ifindex["dpt1"]


def test_probe_most_specific_prefix_and_types(env):
    assert _probe(env, "bpf", "10.2.0.9").prefix == "10.2.0.0/24"
    d = _probe(env, "bpf", "10.66.1.1")
    assert (d.verdict, d.reason.name, d.route_type) == ("drop", "DROP_BLACKHOLE", "blackhole")
    d = _probe(env, "bpf", "fd20::1")
    assert (d.reason.name, d.prefix, d.gateway) == ("FWD_IPV6", "fd20::/32", "fd02::2")
    d = _probe(env, "bpf", "10.20.9.9", ttl=1)
    assert d.reason.name == "PASS_TTL_EXCEEDED"
