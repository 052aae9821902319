"""No silent loss after XDP_REDIRECT (issue 21): a frame the router redirects
into a port that does not take it is counted per egress port and reason (the
tracepoint programs of bpf/xmit.bpf.c), in status and metrics, and the
counts reconcile with what the hosts sent and received.

The lost case is a veth whose peer cannot take redirected frames: `up`
turns GRO on at the peer (bpfrouter/veth.py), so the test turns it off again
behind the router's back."""
import json
import os
import signal
import subprocess
import sys

import pytest

from bpfrouter import xmit
from bpfrouter.bpf import Link
from bpfrouter.datapath import PIN_ROOT, Datapath
from bpfrouter.lab import Lab
from bpfrouter.observe import read_counters
from tests.conftest import ROOT, bpfrouter_cmd

from .test_veth_peer import gro, icmp

PINGS = 25


def status(name: str) -> dict:
    return json.loads(bpfrouter_cmd("status", "--name", name, "-j", check=True).stdout)


class Counts:
    """The router's counters read from its pinned maps (the CLI reads the same)."""

    def __init__(self, lab: Lab):
        self.dp = Datapath.open(lab.name)
        self.port = {name: lab.link("r", name)[0] for name in ("r-eth0", "r-eth1")}

    def redirected(self, ingress: str) -> int:
        return sum(pk for (idx, reason), (pk, _) in read_counters(self.dp).items()
                   if idx == self.port[ingress] and reason.verdict == "redirect")

    def outcomes(self, egress: str) -> dict[str, int]:
        return {o.label: n for (idx, o), n in xmit.read(self.dp).items() if idx == self.port[egress]}


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
    c = Counts(lab)
    lost0 = status(lab.name)["totals"]["redirect_lost"]
    fwd0, out0, echos0 = c.redirected("r-eth0"), c.outcomes("r-eth1"), icmp(lab, "h2", "InEchos")
    events = subprocess.Popen([sys.executable, "-m", "bpfrouter", "events", "--name", lab.name, "-j",
                               "-r", "no_xdp_xmit", "--duration", "20"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert "events of router" in events.stderr.readline()
    pings(lab, PINGS)
    echos = icmp(lab, "h2", "InEchos") - echos0
    toward_h2 = c.redirected("r-eth0") - fwd0
    out = delta(c.outcomes("r-eth1"), out0)
    assert echos == 0, f"{echos} echo requests reached h2 through a peer without NAPI"
    assert toward_h2 == PINGS, f"XDP redirected {toward_h2} of {PINGS} requests"
    assert out == {"no_xdp_xmit": PINGS}, f"r-eth1's redirect outcomes changed by {out}"
    assert status(lab.name)["totals"]["redirect_lost"] - lost0 == PINGS
    events.send_signal(signal.SIGINT)
    out, _ = events.communicate(timeout=30)
    lost = [json.loads(line) for line in out.splitlines()]
    assert lost and all((e["verdict"], e["iface"], e["egress"]) == ("redirect_lost", "r-eth0", "r-eth1")
                        for e in lost), lost[:3]
    assert sum(e["frames"] for e in lost) == PINGS, f"events for {sum(e['frames'] for e in lost)} frames"

    # GRO back on: every redirect delivered, and counted as sent on both ports
    gro(lab, "h2", on=True)
    before = {p: (c.redirected(p), c.outcomes(p)) for p in c.port}
    echos0, replies0 = icmp(lab, "h2", "InEchos"), icmp(lab, "h1", "InEchoReps")
    pings(lab, PINGS)
    echos, replies = icmp(lab, "h2", "InEchos") - echos0, icmp(lab, "h1", "InEchoReps") - replies0
    for ingress, egress, arrived in (("r-eth0", "r-eth1", echos), ("r-eth1", "r-eth0", replies)):
        sent = c.redirected(ingress) - before[ingress][0]
        out = delta(c.outcomes(egress), before[egress][1])
        assert sent == arrived == PINGS and out == {"sent": PINGS}, \
            f"{ingress}->{egress}: redirected {sent}, outcomes {out}, {arrived} arrived"

    text = bpfrouter_cmd("metrics", "--once", "--name", lab.name, check=True).stdout
    from prometheus_client.parser import text_string_to_metric_families
    samples = {(s.labels["interface"], s.labels["outcome"]): s.value
               for fam in text_string_to_metric_families(text) if fam.name == "bpfrouter_redirect_packets"
               for s in fam.samples if s.name.endswith("_total")}
    # every redirect toward h2 since `up` is either sent or lost
    assert samples[("r-eth1", "no_xdp_xmit")] == PINGS
    assert samples[("r-eth1", "sent")] + PINGS == c.redirected("r-eth0")
    human = bpfrouter_cmd("status", "--name", lab.name, check=True).stdout
    assert f"{PINGS} lost after redirect" in human, human

    # pinned with the router (they count while no agent runs), gone with `down`
    pins = {p.name for p in (PIN_ROOT / lab.name).iterdir()}
    assert {"xmit_counters", "tp_xmit_devmap_xmit", "tp_xmit_redirect_err", "tp_xmit_exception"} <= pins
    mine = []  # this router's tracepoint programs (others may run beside it), through its pinned links
    for pin in sorted((PIN_ROOT / lab.name).glob("tp_xmit_*")):
        link = Link.pinned(str(pin))
        mine.append(link.info().prog_id)
        link.close()
    assert len(mine) == 3
    c.dp.close()
    bpfrouter_cmd("down", "--name", lab.name, check=True)
    left = {p["id"] for p in json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                                       text=True, check=True).stdout)}
    assert not set(mine) & left, "the tracepoint programs outlived `down`"
