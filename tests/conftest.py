"""Shared fixtures. Tests skip (with the reason) only where the machine lacks
root or BPF; on a Debian 12 VM run as root, everything runs.

Under CI=true nothing may skip for want of a capability: a run that would
skip the data-plane and end-to-end tests stops at collection with one line
saying what is missing, and any other test that skips fails."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OBJECT = ROOT / "build" / "router.bpf.o"
BASELINE = ROOT / "build" / "baseline.bpf.o"


def _bpf_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_BPF, CAP_NET_ADMIN)"
    if not OBJECT.exists():
        return "build/router.bpf.o missing: run `make build`"
    with open("/proc/mounts") as f:
        if not any(" /sys/fs/bpf bpf " in line for line in f):
            return "bpffs not mounted at /sys/fs/bpf"
    try:
        from bpfrouter.bpf import BpfObject
        with BpfObject(str(BASELINE)) as o:
            o.load()
    except Exception as e:  # no BPF in this kernel / container
        return f"cannot load BPF programs here: {e}"
    return None


BPF_SKIP = _bpf_unavailable()
needs_bpf = pytest.mark.skipif(BPF_SKIP is not None, reason=BPF_SKIP or "")
CI = os.environ.get("CI", "").lower() in ("true", "1")


def pytest_collection_modifyitems(config, items):
    bpf_items = [item for item in items if "/dataplane/" in str(item.fspath) or "/e2e/" in str(item.fspath)]
    if BPF_SKIP and bpf_items and CI:
        pytest.exit(f"CI=true but the data-plane and end-to-end tests ({len(bpf_items)}) cannot run here: {BPF_SKIP}",
                    returncode=1)
    for item in bpf_items:
        item.add_marker(needs_bpf)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a skip is a failure (an expected failure, xfail, stays one)."""
    report = yield
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"CI=true: tests may not skip here: {reason}"
    return report


def bpfrouter_cmd(*args: str, netns: str | None = None, check: bool = False,
                  timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the real `bpfrouter` command as a user would."""
    argv = [sys.executable, "-m", "bpfrouter"]
    if netns:
        argv += ["--netns", netns]
    proc = subprocess.run(argv + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"bpfrouter {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc
