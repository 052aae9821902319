"""Bad input gets one line saying what is wrong, a non-zero exit, no
traceback, and leaves no state behind."""
import os
import sys

import pytest

from bpfrouter.datapath import PIN_ROOT
from bpfrouter.router import DEFAULT_NAME
from bpfrouter.lab import Lab
from tests.conftest import ROOT, bpfrouter_cmd


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr
    for f in fragments:
        assert f in err, err


@pytest.fixture(scope="module")
def lab():
    lb = Lab(f"x{os.getpid() % 10000}")
    lb.up()
    yield lb
    lb.down()


def pins() -> set[str]:
    return set(os.listdir(PIN_ROOT)) if PIN_ROOT.exists() else set()


def named_by(args: list[str]) -> set[str]:
    """The routers a command could leave pinned: its --name's (and the
    first part of a name with a slash), or the default one. Only these are
    compared: the data-plane tests, run beside these by `make test`, pin
    and unpin routers of their own at any moment."""
    if "--name" not in args:
        return {DEFAULT_NAME}
    name = args[args.index("--name") + 1]
    return {name, name.split("/")[0]}


@pytest.mark.parametrize("args,fragments", [
    (["up", "nosuch"], ["unknown interface 'nosuch'"]),
    (["up", "r-eth0", "r-eth0"], ["named twice"]),
    (["up", "r-eth0", "--name", "bad/name"], ["invalid router name"]),
    (["up", "r-eth0", "--fib", "fast"], ["Invalid value for '--fib'"]),
    (["up"], ["Missing argument"]),
    (["status", "--name", "nosuch"], ["no router named 'nosuch'"]),
    (["route", "add", "10.0.0.0/33", "dev", "r-eth0"], ["invalid prefix"]),
    (["route", "add", "10.0.0.0/8"], ["needs 'via ADDR' or 'dev IFNAME'"]),
    (["route", "get", "10.0.0.999"], ["invalid destination"]),
    (["frobnicate"], ["No such command"]),
])
def test_bad_arguments(lab, args, fragments):
    before = pins()
    assert_one_line_error(bpfrouter_cmd(*args, netns=lab.router_ns), *fragments)
    assert not (pins() - before) & named_by(args), "a refused command left a router pinned"


def test_unknown_netns():
    assert_one_line_error(bpfrouter_cmd("status", netns="no-such-ns"), "does not exist")


def test_name_in_use_and_xdp_already_attached(lab):
    name = lab.name
    bpfrouter_cmd("up", "r-eth0", "--name", name, netns=lab.router_ns, check=True)
    try:
        assert_one_line_error(bpfrouter_cmd("up", "r-eth1", "--name", name, netns=lab.router_ns),
                              "already running")
        assert_one_line_error(bpfrouter_cmd("up", "r-eth0", "--name", name + "b", netns=lab.router_ns),
                              "already runs XDP program")
        assert not (PIN_ROOT / (name + "b")).exists(), "a failed up left pins behind"
        assert_one_line_error(bpfrouter_cmd("route", "get", "10.0.2.2", "iif", "nosuch", "--name", name),
                              "unknown interface")
        assert_one_line_error(bpfrouter_cmd("route", "add", "10.9.0.0/16", "via", "10.7.7.7", "--name", name),
                              "not on a connected network")
        assert_one_line_error(bpfrouter_cmd("route", "add", "10.9.0.0/16", "dev", "nosuch", "--name", name),
                              "unknown interface 'nosuch'")
    finally:
        bpfrouter_cmd("down", "--name", name, check=True)
    assert not (PIN_ROOT / name).exists()


def test_not_root():
    import subprocess
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-m", "bpfrouter", "up", "lo", "--name", "nonroot"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HOME": "/tmp"})
    assert_one_line_error(proc, "needs root")


def test_no_bpffs():
    import subprocess
    proc = subprocess.run(["unshare", "-m", "sh", "-c",
                           f"umount /sys/fs/bpf && exec {sys.executable} -m bpfrouter up lo --name nobpffs"],
                          capture_output=True, text=True, cwd=ROOT)
    assert_one_line_error(proc, "bpffs is not mounted")
    assert not (PIN_ROOT / "nobpffs").exists()


def test_native_falls_back_to_generic_and_reports_it(lab):
    # loopback has no native XDP support: the mode in use must say generic
    name = lab.name + "lo"
    bpfrouter_cmd("up", "lo", "--name", name, netns=lab.router_ns, check=True)
    try:
        import json
        st = json.loads(bpfrouter_cmd("status", "-j", "--name", name, check=True).stdout)
        assert [i["xdp_mode"] for i in st["interfaces"]] == ["generic"]
    finally:
        bpfrouter_cmd("down", "--name", name, check=True)
