"""Maglev's table (bpfrouter/lb/maglev.py) and the service syntax
(bpfrouter/lb/service.py)."""
from __future__ import annotations

import random

import pytest

from bpfrouter.lb import maglev
from bpfrouter.lb.service import Service, ServiceError, ServiceId, apply_options, parse_service_id, parse_weight


def members(n, seed=1, weight=1):
    rng = random.Random(seed)
    return [maglev.Member(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{i % 250 + 1}", weight) for i in range(n)]


def test_sizes_are_primes_and_grow_with_the_backends():
    assert all(maglev.is_prime(s) for s in maglev.SIZES)
    assert maglev.table_size(3) == 1021 and maglev.table_size(11) == 4093 and maglev.table_size(100) == 16381
    assert maglev.table_size(11, current=1021) == 4093, "outgrown: the next size"
    assert maglev.table_size(5, current=4093) == 4093, "never shrinks on its own"
    with pytest.raises(maglev.MaglevError):
        maglev.check_size(1000)


@pytest.mark.parametrize("weights", [[1, 2], [1, 2, 3, 4], [5, 1, 1, 1, 1, 1]])
def test_weights_give_their_share(weights):
    ms = [maglev.Member(f"10.0.0.{i + 1}", w) for i, w in enumerate(weights)]
    size = maglev.table_size(len(ms))
    shares = maglev.shares(maglev.build(ms, size), len(ms))
    for s, w in zip(shares, weights):
        assert abs(s - w / sum(weights)) < 0.01, (shares, weights)


def test_every_slot_filled_and_a_zero_weight_gets_none():
    ms = members(7) + [maglev.Member("10.9.9.9", 0)]
    t = maglev.build(ms, 1021)
    assert -1 not in t and 7 not in t
    assert maglev.build([maglev.Member("10.9.9.9", 0)], 1021) == [-1] * 1021


def test_same_definition_same_table_in_any_order():
    ms = members(20)
    a = [ms[i].key for i in maglev.build(ms, 4093)]
    rev = list(reversed(ms))
    assert [rev[i].key for i in maglev.build(rev, 4093)] == a


def test_removing_one_backend_moves_little_beyond_its_own():
    ms = members(100)
    size = maglev.table_size(100)
    full = [ms[i].key for i in maglev.build(ms, size)]
    rest = ms[:40] + ms[41:]
    after = [rest[i].key for i in maglev.build(rest, size)]
    moved = maglev.moved(full, after)
    own = full.count(ms[40].key) / size
    assert own <= moved < 3 * 0.01, (own, moved)
    assert maglev.moved(full, full) == 0 and maglev.moved(full, after[:-1]) == 1.0


@pytest.mark.parametrize("words,want", [
    (["tcp", "10.0.0.1:80"], ServiceId("tcp", "10.0.0.1", 80)),
    (["udp", "10.0.0.1"], ServiceId("udp", "10.0.0.1", 0)),
    (["TCP", "[2001:db8::1]:443"], ServiceId("tcp", "2001:db8::1", 443)),
    (["udp", "2001:db8::1"], ServiceId("udp", "2001:db8::1", 0)),
])
def test_service_ids(words, want):
    sid, rest = parse_service_id(words + ["x"])
    assert sid == want and rest == ["x"]
    assert parse_service_id(str(sid).split())[0] == sid


@pytest.mark.parametrize("words", [["tcp"], ["sctp", "10.0.0.1:80"], ["tcp", "10.0.0.1:70000"], ["tcp", "nope:80"],
                                   ["tcp", "[2001:db8::1"], ["tcp", "224.0.0.1:80"], ["tcp", "0.0.0.0:80"]])
def test_bad_service_ids(words):
    with pytest.raises(ServiceError):
        parse_service_id(words)


def test_options_and_their_errors():
    svc = Service(ServiceId("tcp", "10.0.0.1", 80))
    apply_options(svc, ["check", "http", "path", "/h", "status", "204", "interval", "0.5", "rise", "1", "fall", "4",
                        "no-affinity", "table-size", "4093"])
    c = svc.check
    assert (c.kind, c.path, c.status, c.interval, c.rise, c.fall) == ("http", "/h", 204, 0.5, 1, 4)
    assert not svc.affinity and svc.table_size == 4093
    for bad in (["check", "icmp"], ["rise", "0"], ["interval", "x"], ["path", "h"], ["bogus"], ["check", "exec"],
                ["table-size", "1024"], ["fall"]):
        with pytest.raises(ServiceError):
            apply_options(Service(ServiceId("tcp", "10.0.0.1", 80)), bad)
    with pytest.raises(ServiceError, match="check-port"):
        apply_options(Service(ServiceId("tcp", "10.0.0.1", 0)), [])
    udp = Service(ServiceId("udp", "10.0.0.1", 53))
    apply_options(udp, [])
    assert udp.check.kind == "none", "a UDP service is not TCP-checked by default"
    for bad in (["mode", "nat"], ["mode", "nat", "check", "none"]):  # NAT needs its checks
        with pytest.raises(ServiceError, match="health check"):
            apply_options(Service(ServiceId("udp", "10.0.0.1", 53)), bad)
    with pytest.raises(ServiceError, match="no-affinity"):
        apply_options(Service(ServiceId("tcp", "10.0.0.1", 80)), ["mode", "nat", "no-affinity"])
    with pytest.raises(ServiceError):
        apply_options(Service(ServiceId("tcp", "10.0.0.1", 80)), ["mode", "fullnat"])
    gue = Service(ServiceId("tcp", "10.0.0.1", 80))
    apply_options(gue, ["encap", "gue"])
    assert (gue.mode, gue.encap) == ("dsr", "gue") and Service.from_json(gue.to_json()) == gue
    with pytest.raises(ServiceError, match="ipip.*gue"):
        apply_options(Service(ServiceId("tcp", "10.0.0.1", 80)), ["encap", "vxlan"])
    with pytest.raises(ServiceError, match="encap is dsr's"):
        apply_options(Service(ServiceId("tcp", "10.0.0.1", 80)), ["mode", "nat", "encap", "gue"])


def test_backend_changes():
    from bpfrouter.lb.service import parse_backend_change
    assert parse_backend_change("add", ["10.0.0.2", "weight", "3"]) == ("10.0.0.2", 3)
    assert parse_backend_change("drain", ["10.0.0.2"]) == ("10.0.0.2", 0)
    assert parse_backend_change("del", ["2001:db8::2"]) == ("2001:db8::2", None)
    assert parse_backend_change("weight", ["10.0.0.2", "0"]) == ("10.0.0.2", 0)
    for op, words in (("drain", ["10.0.0.2", "now"]), ("del", ["10.0.0.2", "x"]), ("weight", ["10.0.0.2"]),
                      ("add", []), ("add", ["host"]), ("weight", ["10.0.0.2", "1", "2"])):
        with pytest.raises(ServiceError):
            parse_backend_change(op, words)


def test_weights():
    assert parse_weight([]) == 1 and parse_weight(["weight", "0"]) == 0
    for bad in (["weight"], ["weight", "-1"], ["weight", "70000"], ["w", "1"], ["weight", "1", "x"]):
        with pytest.raises(ServiceError):
            parse_weight(bad)
