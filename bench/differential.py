#!/usr/bin/env python3
"""The frame differential at size (`make bench-differential`, docs/benchmarks.md).

The corpus of tests/e2e/test_frame_differential.py, ten times the random
part by default, through the kernel's forwarding and through bpfrouter in the
same lab (tests/framediff.py says how). Prints every divergence, then a count
per trait; exits 1 if a divergence has no trait the test's known list
accepts (an unexpected one), 0 otherwise."""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import BASELINE, bpfrouter_cmd  # noqa: E402
from tests.e2e.test_frame_differential import KNOWN_DIVERGENCES, unexpected  # noqa: E402
from tests.framediff import SYSCTL_PHASES, FrameLab, build_corpus, run_differential  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=None, help="corpus seed (default: random, printed)")
    ap.add_argument("--valid", type=int, default=2000, help="valid frames (default 2000)")
    ap.add_argument("--mutations", type=int, default=6000, help="randomly mutated frames (default 6000)")
    ap.add_argument("--phase-frames", type=int, default=300, help="routable frames per sysctl phase (default 300)")
    ap.add_argument("--fib", choices=("bpf", "kernel"), default="bpf", help="bpfrouter's --fib")
    ap.add_argument("--quiet", action="store_true", help="details of unexpected divergences only, and the counts")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    name = f"fdb{os.getpid() % 10000}"
    fl = FrameLab(name, str(BASELINE))

    def up():
        bpfrouter_cmd("up", "r-eth0", "r-eth1", "--name", name, "--fib", args.fib, netns=fl.lab.router_ns,
                      check=True)

    def down():
        bpfrouter_cmd("down", "--name", name, check=True)

    try:
        cases = build_corpus(seed, fl.r_mac, fl.h1_mac, args.valid, args.mutations)
        print(f"frame differential: seed {seed}, {len(cases)} frames, then {args.phase_frames} routable ones in "
              f"each of {len(SYSCTL_PHASES)} sysctl phases, bpfrouter --fib {args.fib}", flush=True)
        t0 = time.monotonic()
        diverged = run_differential(fl, cases, sorted(SYSCTL_PHASES), args.phase_frames, up, down)
        t1 = time.monotonic()
    finally:
        fl.down()
    if not args.quiet:
        for d in diverged:
            print(d)
    per_trait = Counter(t for d in diverged for t in (d.traits or {"(none)"}))
    print(f"\n{len(diverged)} frames diverge ({t1 - t0:.0f} s)")
    for trait, n in per_trait.most_common():
        print(f"  {n:6d}  {trait:28s} {KNOWN_DIVERGENCES.get(trait, 'UNEXPECTED')}")
    bad = unexpected(diverged)
    if bad:
        if args.quiet:
            for d in bad:
                print(d)
        print(f"{len(bad)} unexpected divergences (no known trait); seed {seed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
