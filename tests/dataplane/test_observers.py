"""The data plane's observers through BPF_PROG_TEST_RUN: events for drops and
passes (fields, rate cap), the flow table, and the capture hook. Each test
gets its own data plane, so no other test's packets or rate windows leak in."""
import socket
import struct
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpfrouter import netns
from bpfrouter.bpf import Link, Program, RingBuffer, map_info, prog_map_ids
from bpfrouter.capture import Capture, decode, release_stale
from bpfrouter.datapath import DatapathError
from bpfrouter.datapath import layout as lo
from bpfrouter.observe import run_probe
from bpfrouter.telemetry import decode_event, obs_stats, read_flows

from .harness import MAC_GW, NS, XDP_REDIRECT, own_datapath

SRC_MAC = "02:00:00:00:00:aa"


@pytest.fixture
def dp(env, request):
    with own_datapath(env, "obs", **getattr(request, "param", {})) as d:
        yield d


def frame(env, dst, l4, ttl=64, src="10.1.0.5", **ip):
    return bytes(Ether(dst=env.if0_mac, src=SRC_MAC) / IP(src=src, dst=dst, ttl=ttl, **ip) / l4)


def run(env, dp, pkt, repeat=1):
    with netns.entered(NS):
        return dp.program.test_run(pkt, ingress_ifindex=env.ifindex["dpt0"], repeat=repeat)


def drain(dp, ring="events", decoder=None):
    got = []
    with netns.entered(NS):  # interface names resolve in the harness namespace
        rb = RingBuffer(dp.maps[ring].fd, lambda raw: got.append((decoder or decode_event)(raw)))
        rb.poll(0)
        rb.close()
    return got


def test_drop_and_pass_events_carry_what_the_pipeline_knew(env, dp):
    drain(dp)
    run(env, dp, frame(env, "10.66.1.1", TCP(sport=1234, dport=80, flags="S")))       # blackhole
    run(env, dp, frame(env, "10.99.9.9", UDP(sport=5000, dport=53)))                  # no route
    run(env, dp, frame(env, "10.20.1.1", UDP(sport=5000, dport=53), ttl=1))          # TTL expires here
    run(env, dp, frame(env, "10.20.1.1", Raw(b"\x13\x88\x00\x35"), proto=17, chksum=0x1234))  # bad checksum
    run(env, dp, frame(env, "10.20.1.1", UDP(sport=5000, dport=53)))                  # forwarded: no event
    ev = drain(dp)
    assert [e["reason"] for e in ev] == ["blackhole", "fib_miss", "ttl_exceeded", "bad_checksum"]
    bh = ev[0]
    assert (bh["verdict"], bh["xdp_action"], bh["iface"], bh["proto"]) == ("drop", "drop", "dpt0", "tcp")
    assert (bh["src"], bh["dst"], bh["sport"], bh["dport"], bh["tcp_flags"], bh["ttl"]) == \
        ("10.1.0.5", "10.66.1.1", 1234, 80, "S", 64)
    assert bh["route"] == {"type": "blackhole", "prefix": "10.66.0.0/16", "proto": "bpfrouter"}
    assert bh["src_mac"] == SRC_MAC and bh["len"] == 54 and bh["vlan"] is None
    assert ev[1]["verdict"] == "pass" and ev[1]["route"] is None and ev[1]["dport"] == 53
    ttl = ev[2]
    assert ttl["route"]["prefix"] == "10.20.0.0/16" and ttl["nexthop_id"] and ttl["egress"] == "dpt1"
    assert ev[3]["verdict"] == "drop" and ev[3]["len"] == 38
    assert obs_stats(dp)["events_sent"] == 4


def test_ipv6_events_name_the_prefix_the_hash_levels_matched(env, dp):
    """An IPv6 event reads the leaf of the slot the forwarding lookup found (no second lookup)."""
    drain(dp)
    run(env, dp, bytes(Ether(dst=env.if0_mac, src=SRC_MAC) / IPv6(src="fd01::5", dst="fd66::1", hlim=9) /
                       UDP(sport=5000, dport=53)))
    run(env, dp, bytes(Ether(dst=env.if0_mac, src=SRC_MAC) / IPv6(src="fd01::5", dst="fd20::1", hlim=1) /
                       UDP(sport=5000, dport=53)))
    ev = drain(dp)
    assert [e["reason"] for e in ev] == ["blackhole", "ttl_exceeded"]
    assert ev[0]["route"] == {"type": "blackhole", "prefix": "fd66::/32", "proto": "bpfrouter"}
    assert ev[1]["route"]["prefix"] == "fd20::/32" and ev[1]["egress"] == "dpt1"


@pytest.mark.parametrize("dp", [{"event_rate": 5}], indirect=True)
def test_events_are_capped_per_reason_and_the_rest_counted(env, dp):
    drain(dp)
    miss = frame(env, "10.99.9.9", UDP(sport=5000, dport=53))
    run(env, dp, miss, repeat=50)          # the same packet 50 times, within one window
    run(env, dp, frame(env, "10.66.1.1", UDP(sport=1, dport=2)))   # another reason has its own budget
    ev = drain(dp)
    assert [e["reason"] for e in ev].count("fib_miss") == 5
    assert [e["reason"] for e in ev].count("blackhole") == 1
    st = obs_stats(dp)
    assert (st["events_sent"], st["events_suppressed"], st["events_lost"]) == (6, 45, 0)


def test_flow_counts_packets_bytes_flags_and_verdict(env, dp):
    syn = frame(env, "10.20.1.1", TCP(sport=40000, dport=80, flags="S"))
    ack = frame(env, "10.20.1.1", TCP(sport=40000, dport=80, flags="A") / (b"x" * 100))
    for pkt in (syn, ack, ack):
        assert run(env, dp, pkt).retval == XDP_REDIRECT
    run(env, dp, frame(env, "10.66.1.1", UDP(sport=7, dport=9)))
    with netns.entered(NS):
        flows = {(f.src, f.dst, f.sport, f.dport): f for f in read_flows(dp)}
    f = flows[("10.1.0.5", "10.20.1.1", 40000, 80)]
    assert (f.packets, f.bytes, f.proto) == (3, len(syn) + 2 * len(ack), 6)
    assert f.reason == lo.Reason.FWD_IPV4 and f.action == XDP_REDIRECT and f.egress == env.ifindex["dpt1"]
    assert f.as_json()["tcp_flags"] == "SA" and f.first_ns <= f.last_ns
    dropped = flows[("10.1.0.5", "10.66.1.1", 7, 9)]
    assert dropped.packets == 1 and dropped.reason.verdict == "drop"
    assert obs_stats(dp)["flows_created"] == 2


def test_ipv6_flow_and_event_carry_the_full_addresses_ports_and_flags(env, dp):
    def frame6(dst, l4):
        return bytes(Ether(dst=env.if0_mac, src=SRC_MAC) / IPv6(src="fd01::5:6:7:8", dst=dst, hlim=64) / l4)

    drain(dp)
    fwd = frame6("fd20::1:2:3:4", TCP(sport=40001, dport=443, flags="SE"))
    for _ in range(2):
        assert run(env, dp, fwd).retval == XDP_REDIRECT
    run(env, dp, frame6("fd99::9", UDP(sport=5353, dport=53)))          # no route: passed, an event
    with netns.entered(NS):
        flows = {(f.src, f.dst, f.sport, f.dport): f for f in read_flows(dp)}
    f = flows[("fd01::5:6:7:8", "fd20::1:2:3:4", 40001, 443)]
    assert (f.packets, f.proto, f.reason) == (2, 6, lo.Reason.FWD_IPV6)
    assert f.as_json()["tcp_flags"] == "SE"
    assert ("fd01::5:6:7:8", "fd99::9", 5353, 53) in flows
    ev = drain(dp)
    assert [(e["src"], e["dst"], e["sport"], e["dport"], e["ttl"]) for e in ev] == \
        [("fd01::5:6:7:8", "fd99::9", 5353, 53, 64)]


def cache_slot(key: lo.FlowKey, slots: int) -> int:
    """flows.h flow_slot_index: multiply-shift over the key's 64-bit words."""
    w, m = struct.unpack("<5Q", bytes(key)), (1 << 64) - 1
    h = ((w[0] ^ ((w[2] << 32 | w[2] >> 32) & m)) * 0x9E3779B97F4A7C15) & m
    h ^= ((w[1] ^ w[3]) * 0xC2B2AE3D27D4EB4F) & m
    h ^= (w[4] * 0x165667B19E3779F9) & m
    return h >> (64 - slots.bit_length() + 1)


def udp_key(src: str, dst: str, sport: int, dport: int) -> lo.FlowKey:
    k = lo.FlowKey(sport=sport, dport=dport, l4_proto=17, family=4)
    k.saddr[:4], k.daddr[:4] = socket.inet_aton(src), socket.inet_aton(dst)
    return k


def test_flows_sharing_a_cache_slot_hand_it_over_without_losing_counts(env, dp):
    slots = dp.maps["flow_cache"].max_entries
    a = udp_key("10.1.0.5", "10.20.1.1", 1000, 53)
    b_port = next(p for p in range(1001, 65536)
                  if cache_slot(udp_key("10.1.0.5", "10.20.1.1", p, 53), slots) == cache_slot(a, slots))
    pkt_a = frame(env, "10.20.1.1", UDP(sport=1000, dport=53))
    pkt_b = frame(env, "10.20.1.1", UDP(sport=b_port, dport=53))
    for pkt in (pkt_a, pkt_a, pkt_b, pkt_a):   # b takes a's slot, then a takes it back
        assert run(env, dp, pkt).retval == XDP_REDIRECT
    table = {k.sport: sum(v.packets for v in per_cpu) for k, per_cpu in dp.maps["flows"].lookup_batch()}
    assert table == {1000: 2, b_port: 1}       # the deltas each flow left when it lost the slot
    with netns.entered(NS):
        flows = {f.sport: f for f in read_flows(dp)}
    assert (flows[1000].packets, flows[b_port].packets) == (3, 1)
    assert flows[1000].bytes == 3 * len(pkt_a)
    assert obs_stats(dp)["flows_created"] == 2
    seen = flows[1000].as_json()
    assert abs(seen["first_seen"] - time.time()) < 5 and seen["first_seen"] <= seen["last_seen"]


def test_probes_are_neither_observed_nor_captured(env, dp):
    with netns.entered(NS):
        Capture(dp).renew()
        out, res = run_probe(dp, frame(env, "10.66.1.1", UDP(sport=1, dport=2)), env.ifindex["dpt0"])
    assert lo.Reason(out.reason) == lo.Reason.DROP_BLACKHOLE
    assert drain(dp) == [] and drain(dp, "capture_ring", decode) == []
    with netns.entered(NS):
        assert read_flows(dp) == []


@pytest.fixture
def attached(env, dp):
    """dp attached to dpt0, so capture swaps a real link's program."""
    with netns.entered(NS):
        dp.attach(env.ifindex["dpt0"], "generic")
    return dp


def run_attached(env, dp, pkt):
    """Runs pkt through whatever program dpt0's link holds now."""
    with netns.entered(NS):
        link = Link.pinned(str(dp.link_path(env.ifindex["dpt0"])))
        prog = Program.from_id(link.info().prog_id)
        link.close()
        try:
            return prog.test_run(pkt, ingress_ifindex=env.ifindex["dpt0"]), prog.id
        finally:
            prog.close()


def test_idle_program_has_no_capture_hook_and_capture_swaps_it_in_and_out(env, attached):
    dp = attached
    fwd = frame(env, "10.20.1.1", UDP(sport=5000, dport=53))
    with netns.entered(NS):
        capture_maps = {map_info(dp.maps[m].fd).id for m in ("capture_cfg", "capture_scratch", "capture_ring")}
        idle, hooked = dp.chain_programs(), dp.chain_programs(capture=True)
        for prog in idle:
            assert not capture_maps & set(prog_map_ids(prog.fd)), f"idle program {prog.id} references capture maps"
        assert capture_maps <= {m for prog in hooked for m in prog_map_ids(prog.fd)}
        for prog in idle + hooked:
            prog.close()
        cap_id = dp.capture_program().id
    assert run_attached(env, dp, fwd)[1] == dp.program.id
    with netns.entered(NS):
        cap = Capture(dp)
        cap.renew()
        assert dp.capture_hooked() == [env.ifindex["dpt0"]]
    res, prog_id = run_attached(env, dp, fwd)
    assert prog_id == cap_id and res.retval == XDP_REDIRECT
    assert [c.data for c in drain(dp, "capture_ring", decode)] == [fwd]
    with netns.entered(NS):
        cap.stop()
        assert dp.capture_hooked() == []
    assert run_attached(env, dp, fwd)[1] == dp.program.id


def test_capture_records_the_frame_before_rewrite_with_its_verdict(env, attached):
    dp = attached
    fwd = frame(env, "10.20.1.1", UDP(sport=5000, dport=53))
    bh = frame(env, "10.66.1.1", UDP(sport=5000, dport=53))
    with netns.entered(NS):
        cap = Capture(dp, verdict="any")
        cap.renew()
    res, _ = run_attached(env, dp, fwd)
    assert res.data[:6] == bytes.fromhex(MAC_GW.replace(":", "")), "the program rewrote the packet it forwarded"
    run_attached(env, dp, bh)
    got = drain(dp, "capture_ring", decode)
    assert [(c.data, c.verdict, c.reason.label) for c in got] == [(fwd, "redirect", "ipv4"), (bh, "drop", "blackhole")]
    assert got[0].egress_ifindex == env.ifindex["dpt1"] and got[0].wirelen == len(fwd)
    with netns.entered(NS):
        cap.stop()
        Capture(dp, verdict="drop").renew()
    run_attached(env, dp, fwd)
    run_attached(env, dp, bh)
    assert [c.verdict for c in drain(dp, "capture_ring", decode)] == ["drop"]
    assert obs_stats(dp)["captured"] == 3


def test_capture_expires_when_its_reader_stops_renewing(env, attached):
    dp = attached
    with netns.entered(NS):
        cap = Capture(dp)
        cap.renew()
        cap.cfg.expires_ns = 1  # a lease in the past: the reader is gone
        dp.maps["capture_cfg"].update(lo.u32(0), cap.cfg)
    run_attached(env, dp, frame(env, "10.20.1.1", UDP(sport=5000, dport=53)))
    assert drain(dp, "capture_ring", decode) == []
    with netns.entered(NS):
        assert release_stale(dp) == [env.ifindex["dpt0"]]    # what the agent does each second
        assert dp.capture_hooked() == [] and release_stale(dp) == []


def test_capture_needs_the_capture_observer(env):
    with own_datapath(env, "nocap", observe=lo.OBS_F_EVENTS | lo.OBS_F_FLOWS) as d, netns.entered(NS):
        with pytest.raises(DatapathError, match="without the capture observer"):
            Capture(d)
