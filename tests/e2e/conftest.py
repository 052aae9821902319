"""End-to-end fixtures: a namespace lab with bpfrouter running in its router
namespace, driven through the real `bpfrouter` command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ipaddress

from bpfrouter import netns
from bpfrouter.datapath import Datapath
from bpfrouter.interfaces import Interfaces
from bpfrouter.lab import Lab
from bpfrouter.observe import probe
from tests.conftest import BPF_SKIP, bpfrouter_cmd

HERE = Path(__file__).parent


class RouterProgram:
    """A lab router's loaded program, probed in-process from inside its
    namespace (as `route get` probes it), from its first port."""

    def __init__(self, lab: Lab):
        self.lab = lab
        with netns.entered(lab.router_ns):
            self.dp = Datapath.open(lab.name)
            iface = Interfaces(self.dp).configured()
        self.iif = min(iface)
        self.mac = bytes(iface[self.iif].mac)

    def probe(self, dst, **fields):
        """observe.probe's Decision; fields: src, sport, dport, ... as it takes them."""
        with netns.entered(self.lab.router_ns):
            return probe(self.dp, ipaddress.ip_address(dst), self.iif, self.mac, **fields)

    def close(self) -> None:
        self.dp.close()


class LabRouter:
    def __init__(self, lab: Lab, fib: str):
        self.lab, self.fib, self.name = lab, fib, lab.name

    def cli(self, *args, check=True, timeout=60):
        return bpfrouter_cmd(*args, "--name", self.name, check=check, timeout=timeout) \
            if args[0] not in ("lab",) else bpfrouter_cmd(*args, check=check)

    def json(self, *args):
        return json.loads(self.cli(*args, "-j").stdout)

    def counter(self, iface: str, reason: str) -> int:
        st = self.json("status")
        return sum(c["packets"] for c in st["counters"] if c["iface"] == iface and c["reason"] == reason)

    def forwarded(self) -> int:
        return self.json("status")["totals"]["redirect"]

    def ping(self, src: str, dst: str, count: int = 3) -> bool:
        return self.lab.run(src, ["ping", "-c", str(count), "-i", "0.2", "-W", "2", dst]).returncode == 0

    def ping_tos(self, src: str, dst: str, tos: int, count: int = 3) -> bool:
        """A ping whose packets carry DS field `tos`."""
        return self.lab.run(src, ["ping", "-Q", hex(tos), "-c", str(count), "-i", "0.2", "-W", "1", dst]).returncode == 0

    def kernel_forwarded(self) -> int:
        return self.lab.kernel_forwarded()

    def transfer(self, dst_node: str, dst_addr: str, size: int, port: int = 5001) -> tuple[str, str]:
        server = self.lab.popen(dst_node, [sys.executable, str(HERE / "tcp_transfer.py"), "server", dst_addr, str(port)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "listening"
            src_node = "h1" if dst_node == "h2" else "h2"
            client = self.lab.run(src_node, [sys.executable, str(HERE / "tcp_transfer.py"), "client", dst_addr,
                                             str(port), str(size)], check=True, timeout=60)
            out, _ = server.communicate(timeout=30)
        finally:
            server.kill()
        return client.stdout.strip(), out.strip()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def _make(fib: str, tag: str, *up_args: str):
    name = f"e{os.getpid() % 10000}{tag}"
    lab = Lab(name)
    lab.up()
    proc = bpfrouter_cmd("up", "r-eth0", "r-eth1", "--name", name, "--fib", fib, *up_args, netns=lab.router_ns)
    if proc.returncode != 0:
        lab.down()
        raise RuntimeError(f"bpfrouter up failed: {proc.stderr}")
    return LabRouter(lab, fib)


@pytest.fixture(scope="module", params=["bpf", "kernel"])
def lab_router(request):
    if BPF_SKIP:
        pytest.skip(BPF_SKIP)
    lr = _make(request.param, request.param[0])
    yield lr
    lr.lab.down()


@pytest.fixture(scope="module")
def bpf_router():
    if BPF_SKIP:
        pytest.skip(BPF_SKIP)
    lr = _make("bpf", "s")
    yield lr
    lr.lab.down()


METRICS_LISTEN = "127.0.0.1:9469"  # inside the lab's router namespace


@pytest.fixture(scope="module")
def observed_router():
    """A BPF-FIB router whose agent serves Prometheus metrics."""
    if BPF_SKIP:
        pytest.skip(BPF_SKIP)
    lr = _make("bpf", "o", "--metrics", METRICS_LISTEN)
    yield lr
    lr.lab.down()
