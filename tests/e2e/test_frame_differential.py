"""Differential test of whole frames: the kernel's forwarding against
bpfrouter's, on one corpus (tests/framediff.py: how frames are sent, captured
and compared, and why the outcome is deterministic).

The same frames go through the lab router twice, first with the kernel alone,
then with `bpfrouter up`: what arrives at h2 must be the same bytes, and what
comes back to h1 (the kernel's ICMP errors, replies) the same. The corpus:
valid TCP/UDP/ICMP of both families, TTL and hop limit 0 to 2, bad checksums,
martian and spoofed addresses, fragments, IPv4 options, IPv6 extension-header
chains, truncated and odd L4 headers, frames over the egress MTU with and
without DF, VLAN tags, broadcast and multicast, and random header mutations
of valid frames (seeded; the seed is printed on failure; FRAMEDIFF_SEED sets
it). Then some of the frames again with forwarding turned off by sysctl
(PHASES), bpfrouter restarted with the sysctl set.

A frame whose outcomes differ is a divergence. KNOWN_DIVERGENCES lists the
classes of divergence of today's data plane, by a trait read from the frame's
bytes alone (or the sysctl phase it ran in): a divergence is accepted when
its frame has one of them. Each listed class is an expected failure of its
own while frames of it still diverge; once none does, that test fails and
asks for the entry to go. A divergence of a frame without a listed trait
fails test_no_unexpected_divergence."""
from __future__ import annotations

import json
import os
import random

import pytest

from tests.conftest import BASELINE, BPF_SKIP, bpfrouter_cmd
from tests.framediff import FrameLab, build_corpus, run_differential

SEED = int(os.environ.get("FRAMEDIFF_SEED", random.randrange(1 << 32)))
VALID, MUTATIONS = 200, 600   # bench/differential.py runs ten times more
# Runs with forwarding sysctls off, on some frames; bpfrouter restarts for
# each (seconds), so two here, all of SYSCTL_PHASES in bench/differential.py.
PHASES, PHASE_FRAMES = ["ipv4-forwarding-off-ingress", "ipv6-forwarding-off"], 30

# trait -> why the fast path and the kernel disagree on such frames (issue 21)
KNOWN_DIVERGENCES = {
    "ipv4-bad-header-checksum": "IPv4 headers with a bad checksum are forwarded; the kernel drops them "
                                "(RFC 1812 5.2.2)",
    "reverse-path": "no reverse-path filter: a source the kernel would not route back out of the ingress port is "
                    "forwarded; the kernel (rp_filter=1) drops it",
    "martian-source": "martian sources (0/8, 127/8, multicast, class E, broadcast; IPv6 multicast, loopback, "
                      "unspecified) are forwarded; the kernel drops them",
    "local-source": "a source that is one of the router's own addresses is forwarded; the kernel drops it "
                    "(accept_local=0)",
    "trailing-bytes": "bytes after the IP packet (Ethernet padding) are forwarded with it; the kernel trims the "
                      "frame to the IP length",
    "l4-tcp-header": "a TCP header that is truncated or has a data offset under 5 or past the packet is dropped; "
                     "the kernel forwards it",
    "l4-udp-header": "a UDP header that is truncated or has a length under 8 is dropped; the kernel forwards it",
    "l4-icmp-short": "ICMP under 8 bytes or ICMPv6 under 4 is dropped; the kernel forwards it",
    "ipv6-exthdr-chain-over-8": "more than 8 IPv6 extension headers are dropped; the kernel forwards them",
    "ipv4-forwarding-off-ingress": "net.ipv4.conf.<ingress>.forwarding=0 is ignored: frames are forwarded the "
                                   "kernel drops",
    "ip-forward-off": "net.ipv4.ip_forward=0 is ignored: frames are forwarded the kernel drops",
    "ipv6-forwarding-off": "net.ipv6.conf.all.forwarding=0 is ignored: frames are forwarded the kernel drops",
}


@pytest.fixture(scope="module")
def run():
    """(corpus, divergences, bpfrouter's status after the first run)."""
    if BPF_SKIP:
        pytest.skip(BPF_SKIP)
    name = f"f{os.getpid() % 10000}"
    fl = FrameLab(name, str(BASELINE))
    status = {}

    def up():
        bpfrouter_cmd("up", "r-eth0", "r-eth1", "--name", name, netns=fl.lab.router_ns, check=True)

    def down():
        bpfrouter_cmd("down", "--name", name, check=True)

    def read_status():
        status.update(json.loads(bpfrouter_cmd("status", "-j", "--name", name, check=True).stdout))

    try:
        cases = build_corpus(SEED, fl.r_mac, fl.h1_mac, VALID, MUTATIONS)
        diverged = run_differential(fl, cases, PHASES, PHASE_FRAMES, up, down, read_status)
    finally:
        fl.down()
    return cases, diverged, status


def unexpected(divergences):
    return [d for d in divergences if not d.traits & KNOWN_DIVERGENCES.keys()]


def test_fast_path_forwarded(run):
    """The bpfrouter run really went through XDP: every routable frame and the
    two forwarded sentinels of every window were redirected by the program."""
    cases, _, status = run
    routable = sum(c.routable for c in cases)
    assert status["totals"]["redirect"] >= routable + 2 * len(cases), status["totals"]


def test_no_unexpected_divergence(run):
    cases, diverged, _ = run
    bad = unexpected(diverged)
    assert not bad, f"seed {SEED}: {len(bad)} frames diverge from the kernel:\n" + \
        "\n".join(str(d) for d in bad[:15])


@pytest.mark.parametrize("trait", sorted(KNOWN_DIVERGENCES))
def test_known_divergence(run, trait):
    cases, diverged, _ = run
    these = [d for d in diverged if trait in d.traits]
    if these:
        pytest.xfail(f"{KNOWN_DIVERGENCES[trait]}; {len(these)} frames, e.g. {these[0]}")
    assert trait not in PHASES and not any(trait in c.traits for c in cases), \
        f"frames with trait {trait} no longer diverge: remove it from KNOWN_DIVERGENCES"
