"""Real traffic across the lab router, in both FIB modes, with counters that
prove the XDP program forwarded it and the kernel did not."""
import pytest

from bpfrouter.packet import mac_str

from .conftest import wait_for


@pytest.mark.parametrize("version", [4, 6])
def test_ping_is_forwarded_by_xdp(lab_router, version):
    lab = lab_router.lab
    lab_router.ping("h1", lab.addr("h2", version), count=1)  # resolves neighbors
    reason = f"ipv{version}"
    before_in = lab_router.counter("r-eth0", reason)
    before_back = lab_router.counter("r-eth1", reason)
    assert lab_router.ping("h1", lab.addr("h2", version), count=5)
    assert lab_router.counter("r-eth0", reason) - before_in >= 5
    assert lab_router.counter("r-eth1", reason) - before_back >= 5


@pytest.mark.parametrize("version", [4, 6])
def test_tcp_transfer_takes_the_fast_path(lab_router, version):
    lab = lab_router.lab
    assert lab_router.ping("h1", lab.addr("h2", version), count=1)
    size = 4 << 20
    fwd_before, kernel_before = lab_router.forwarded(), lab_router.kernel_forwarded()
    sent, received = lab_router.transfer("h2", lab.addr("h2", version), size)
    assert sent == received and sent.startswith(str(size))
    redirected = lab_router.forwarded() - fwd_before
    kernel = lab_router.kernel_forwarded() - kernel_before
    assert redirected >= size // 65536, f"only {redirected} packets took the XDP path"
    assert kernel <= 3, f"the kernel forwarded {kernel} packets that XDP should have"


def test_kernel_route_change_takes_effect(lab_router):
    lab = lab_router.lab
    lab.run("h2", ["ip", "addr", "add", "10.98.0.1/32", "dev", "lo"], check=True)
    assert not lab_router.ping("h1", "10.98.0.1", count=1)
    lab.run("r", ["ip", "route", "add", "10.98.0.0/16", "via", "10.0.2.2"], check=True)
    if lab_router.fib == "bpf":
        got = wait_for(lambda: lab_router.json("route", "get", "10.98.0.1")["route"]["prefix"] == "10.98.0.0/16")
        assert got, "route from `ip route` did not reach the BPF FIB"
        assert lab_router.json("route", "get", "10.98.0.1")["route"]["proto"] == "boot"
    before = lab_router.forwarded()
    assert lab_router.ping("h1", "10.98.0.1", count=3)
    assert lab_router.forwarded() - before >= 3
    lab.run("r", ["ip", "route", "del", "10.98.0.0/16"], check=True)
    assert wait_for(lambda: lab_router.json("route", "get", "10.98.0.1")["verdict"] == "pass")
    assert not lab_router.ping("h1", "10.98.0.1", count=1)


def test_neighbor_mac_change_reaches_the_data_plane(lab_router):
    lab = lab_router.lab
    assert lab_router.ping("h1", "10.0.2.2", count=1)
    new_mac = "02:00:00:aa:bb:cc"
    lab.run("h2", ["ip", "link", "set", "h2-eth0", "address", new_mac], check=True)
    # The router learns the new MAC: either from h2's next packet or a re-resolution.
    lab.run("r", ["ip", "neigh", "flush", "dev", "r-eth1"], check=True)
    assert lab_router.ping("h1", "10.0.2.2", count=3)
    assert wait_for(lambda: lab_router.json("route", "get", "10.0.2.2")["neighbor"] == new_mac)
    before = lab_router.counter("r-eth0", "ipv4")
    assert lab_router.ping("h1", "10.0.2.2", count=3)
    assert lab_router.counter("r-eth0", "ipv4") - before >= 3
    if lab_router.fib == "bpf":
        # h2's own ARP probes of the router would teach the router 10.0.2.2
        # again (an ARP request creates the sender's entry): pin h2's entry first.
        _, r_mac = lab.link("r", "r-eth1")
        lab.run("h2", ["ip", "neigh", "replace", "10.0.2.1", "lladdr", mac_str(r_mac), "dev", "h2-eth0",
                       "nud", "permanent"], check=True)
        lab.run("r", ["ip", "neigh", "del", "10.0.2.2", "dev", "r-eth1"], check=True)
        assert wait_for(lambda: lab_router.json("route", "get", "10.0.2.2")["reason"] == "no_neigh")


def test_status_reports_interfaces_and_modes(lab_router):
    st = lab_router.json("status")
    assert st["fib_mode"] == lab_router.fib and st["agent"]["running"]
    assert {i["name"] for i in st["interfaces"]} == {"r-eth0", "r-eth1"}
    assert all(i["xdp_mode"] == "native" for i in st["interfaces"])
    assert st["program"]["id"] > 0 and st["fib"]["ipv4"] > 0


def test_cli_route_takes_effect(lab_router):
    lab = lab_router.lab
    lab.run("h2", ["ip", "addr", "add", "10.91.0.1/32", "dev", "lo"], check=True)
    assert not lab_router.ping("h1", "10.91.0.1", count=1)
    lab_router.cli("route", "add", "10.91.0.0/16", "via", "10.0.2.2")
    before = lab_router.forwarded()
    assert lab_router.ping("h1", "10.91.0.1", count=3)
    assert lab_router.forwarded() - before >= 3
    lab_router.cli("route", "del", "10.91.0.0/16")
    assert not lab_router.ping("h1", "10.91.0.1", count=1)
