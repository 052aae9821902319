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
its frame has one of them (none is listed today). A listed class whose frames
no longer diverge fails test_known_divergences_still_diverge, which asks for
the entry to go. A divergence of a frame without a listed trait fails
test_no_unexpected_divergence."""
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

# trait -> why the fast path and the kernel disagree on such frames: none known today. An entry
# makes frames with that trait an expected failure until they agree again.
KNOWN_DIVERGENCES: dict[str, str] = {}


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
    sentinel to beyond h2 of every window were redirected by the program, and
    the sentinel from h1 to h1 was passed to the kernel as a hairpin (which
    the kernel may answer with a redirect)."""
    cases, _, status = run
    routable = sum(c.routable for c in cases)
    assert status["totals"]["redirect"] >= routable + len(cases), status["totals"]
    hairpins = sum(c["packets"] for c in status["counters"] if c["reason"] == "hairpin")
    assert hairpins >= len(cases), hairpins


def test_no_unexpected_divergence(run):
    cases, diverged, _ = run
    bad = unexpected(diverged)
    assert not bad, f"seed {SEED}: {len(bad)} frames diverge from the kernel:\n" + \
        "\n".join(str(d) for d in bad[:15])


def test_known_divergences_still_diverge(run):
    """An entry of KNOWN_DIVERGENCES whose frames agree with the kernel again
    (or no longer occur) must go."""
    _, diverged, _ = run
    stale = [t for t in KNOWN_DIVERGENCES if not any(t in d.traits for d in diverged)]
    assert not stale, f"no longer diverge: remove {stale} from KNOWN_DIVERGENCES"
