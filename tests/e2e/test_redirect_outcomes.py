"""No silent loss after XDP_REDIRECT (issue 21): a frame the router redirects
into a port that does not take it is counted per egress port and reason (the
tracepoint programs of bpf/xmit.bpf.c), in status and metrics, and the
counts reconcile with what the hosts sent and received.

The lost case is a veth whose peer cannot take redirected frames: `up`
turns GRO on at the peer (bpfrouter/veth.py), so the test turns it off again
behind the router's back."""
import json
import os
import subprocess

import pytest

from bpfrouter.datapath import PIN_ROOT
from bpfrouter.lab import Lab
from tests.conftest import bpfrouter_cmd

from .test_veth_peer import gro, icmp

PINGS = 25


def status(name: str) -> dict:
    return json.loads(bpfrouter_cmd("status", "--name", name, "-j", check=True).stdout)


def outcomes(st: dict, iface: str) -> dict[str, int]:
    return {o["outcome"]: o["packets"] for o in st["redirects"]["outcomes"] if o["iface"] == iface}


def redirected(st: dict, iface: str) -> int:
    return sum(c["packets"] for c in st["counters"] if c["iface"] == iface and c["verdict"] == "redirect")


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)
            if after.get(k, 0) - before.get(k, 0)}


@pytest.fixture
def lab():
    lb = Lab(f"x{os.getpid() % 10000}")
    lb.up()
    proc = bpfrouter_cmd("up", "r-eth0", "r-eth1", "--name", lb.name, netns=lb.router_ns)
    assert proc.returncode == 0, proc.stderr
    yield lb
    bpfrouter_cmd("down", "--name", lb.name)
    lb.down()


def pings(lab: Lab, count: int) -> None:
    lab.run("h1", ["ping", "-c", str(count), "-i", "0.02", "-W", "1", lab.addr("h2")])


def test_redirects_into_a_peer_without_napi_are_counted_lost(lab):
    pings(lab, 2)  # neighbors resolved both ways
    assert gro(lab, "h2") and not gro(lab, "h2", on=False)
    before, echos0 = status(lab.name), icmp(lab, "h2", "InEchos")
    pings(lab, PINGS)
    after, echos = status(lab.name), icmp(lab, "h2", "InEchos") - echos0

    toward_h2 = redirected(after, "r-eth0") - redirected(before, "r-eth0")
    out = delta(outcomes(after, "r-eth1"), outcomes(before, "r-eth1"))
    assert echos == 0, f"{echos} echo requests reached h2 through a peer without NAPI"
    assert toward_h2 == PINGS, f"XDP redirected {toward_h2} of {PINGS} requests"
    assert out == {"no_xdp_xmit": PINGS}, f"r-eth1's redirect outcomes changed by {out}"
    assert after["totals"]["redirect_lost"] - before["totals"]["redirect_lost"] == PINGS

    # GRO back on: every redirect delivered, and counted as sent on both ports
    gro(lab, "h2", on=True)
    before, echos0, replies0 = status(lab.name), icmp(lab, "h2", "InEchos"), icmp(lab, "h1", "InEchoReps")
    pings(lab, PINGS)
    after = status(lab.name)
    echos, replies = icmp(lab, "h2", "InEchos") - echos0, icmp(lab, "h1", "InEchoReps") - replies0
    for ingress, egress, arrived in (("r-eth0", "r-eth1", echos), ("r-eth1", "r-eth0", replies)):
        sent = redirected(after, ingress) - redirected(before, ingress)
        out = delta(outcomes(after, egress), outcomes(before, egress))
        assert sent == arrived == PINGS and out == {"sent": PINGS}, \
            f"{ingress}->{egress}: redirected {sent}, outcomes {out}, {arrived} arrived"

    text = bpfrouter_cmd("metrics", "--once", "--name", lab.name, check=True).stdout
    from prometheus_client.parser import text_string_to_metric_families
    samples = {(s.labels["interface"], s.labels["outcome"]): s.value
               for fam in text_string_to_metric_families(text) if fam.name == "bpfrouter_redirect_packets"
               for s in fam.samples if s.name.endswith("_total")}
    # every redirect toward h2 since `up` is either sent or lost
    assert samples[("r-eth1", "no_xdp_xmit")] == PINGS
    assert samples[("r-eth1", "sent")] + PINGS == redirected(after, "r-eth0")
    human = bpfrouter_cmd("status", "--name", lab.name, check=True).stdout
    assert f"{PINGS} lost after redirect" in human, human


def test_counters_are_pinned_and_removed_with_the_router(lab):
    pins = {p.name for p in (PIN_ROOT / lab.name).iterdir()}
    assert {"xmit_counters", "tp_xmit_devmap_xmit", "tp_xmit_redirect_err", "tp_xmit_exception"} <= pins
    ids = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    mine = [p["id"] for p in json.loads(ids) if p.get("name", "").startswith("xmit_")]
    assert len(mine) >= 3
    bpfrouter_cmd("down", "--name", lab.name, check=True)
    left = {p["id"] for p in json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                                       text=True, check=True).stdout)}
    assert not set(mine) & left, "the tracepoint programs outlived `down`"
