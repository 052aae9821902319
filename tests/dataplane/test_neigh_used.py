"""The fast path marks the neighbor entries it forwards with, for the agent
to replay to the kernel (bpfrouter/neighbors.py); a probe (`route get`) is
not traffic and leaves no mark; taking the marks clears them."""
import ipaddress

from bpfrouter import netns
from bpfrouter.neighbors import Neighbors, key_addr, neigh_key
from bpfrouter.observe import probe

from .harness import NS, XDP_REDIRECT, own_datapath
from .test_forwarding import v4, v6


def used(nb: Neighbors, ifindex: int, addr: str) -> int:
    return nb.dp.neighbors.lookup(neigh_key(ifindex, ipaddress.ip_address(addr))).used


def test_forwarding_marks_the_next_hop_used_once(env):
    dpt1 = env.ifindex["dpt1"]
    with own_datapath(env, "used") as dp:
        nb = Neighbors(dp)
        with netns.entered(NS):
            d = probe(dp, "10.20.1.2", env.ifindex["dpt0"], env.mac["dpt0"])
            assert d.verdict == "redirect" and d.neigh_found
            assert used(nb, dpt1, "10.2.0.2") == 0, "a probe marked the neighbor used"
            assert nb.take_used() == []

            for frame in (v4("10.20.1.2")(env), v4("10.20.9.9")(env), v6("fd20::1")(env)):
                assert dp.program.test_run(frame, ingress_ifindex=env.ifindex["dpt0"]).retval == XDP_REDIRECT
            assert used(nb, dpt1, "10.2.0.2") and used(nb, dpt1, "fd02::2")
            assert not used(nb, dpt1, "10.2.0.3"), "a neighbor no packet went to is marked"

            taken = {str(key_addr(k)) for k in nb.take_used()}
        assert taken == {"10.2.0.2", "fd02::2"}
        assert used(nb, dpt1, "10.2.0.2") == 0 and nb.take_used() == []
        # a mirror update (the kernel's next state) keeps the entry, unmarked
        nb.set(dpt1, ipaddress.ip_address("10.2.0.2"), bytes(6 * [2]), 0x04)
        assert used(nb, dpt1, "10.2.0.2") == 0
