"""Helpers shared by the benchmarks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def bpfrouter(*args: str, netns_name: str | None = None) -> str:
    """Run the real `bpfrouter` command, as a user would."""
    argv = [sys.executable, "-m", "bpfrouter"] + (["--netns", netns_name] if netns_name else []) + list(args)
    return subprocess.run(argv, check=True, capture_output=True, text=True, cwd=ROOT).stdout


def start_lab_router(lab, name: str) -> None:
    bpfrouter("up", "r-eth0", "r-eth1", "--name", name, netns_name=lab.router_ns)


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(result, indent=1))
    return path
