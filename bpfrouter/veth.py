"""Veth ports whose peer would drop what XDP redirects into them.

A frame redirected into a veth in native XDP mode goes straight to the
peer's receive queue, which exists only while the peer runs NAPI: with a
native XDP program or with GRO on. Otherwise the kernel drops the frame after
the redirect succeeded, so the router counts it as redirected and nobody sees
it lost. Verified with traffic on 6.18: GRO or a native XDP program on the
peer delivers; a generic XDP program on the peer, or GRO on the router's own
port, does not; with `--xdp-mode generic` the redirect takes the skb path and
needs neither (issue 21)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool
from pyroute2.netlink import NLM_F_REQUEST, genlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

from . import netns
from .datapath import DatapathError

NETDEV_CMD_DEV_GET = 1
NETDEV_XDP_ACT_NDO_XMIT = 1 << 2  # "this device takes redirected frames"


@dataclass
class Peer:
    port: str                 # the router's veth
    name: str                 # its peer
    ns_path: str | None       # where to enter to reach the peer; None: this namespace
    ns_label: str             # the namespace, for messages

    def fixed_line(self) -> str:
        return (f"{self.port}: veth peer {self.name} ({self.ns_label}) had GRO off; "
                f"turned it on so redirected frames are delivered")


def peers_to_fix(ifnames: list[str]) -> list[Peer]:
    """The peers of these ports that would drop redirected frames and can be
    fixed; raises DatapathError for one that cannot be reached."""
    out = []
    with IPRoute() as ipr:
        for name in ifnames:
            msg = ipr.link("get", index=ipr.link_lookup(ifname=name)[0])[0]
            info = msg.get_attr("IFLA_LINKINFO")
            if info is None or info.get_attr("IFLA_INFO_KIND") != "veth":
                continue
            peer = _peer(ipr, msg)
            if peer is not None:
                out.append(peer)
    return out


def _peer(ipr: IPRoute, msg) -> Peer | None:
    port, peer_idx, nsid = msg.get_attr("IFLA_IFNAME"), msg.get_attr("IFLA_LINK"), msg.get_attr("IFLA_LINK_NETNSID")
    if not peer_idx:
        return None
    # Name and XDP state can be read across namespaces; GRO only from inside.
    kw = {} if nsid is None else {"IFLA_IF_NETNSID": nsid}
    pmsg = ipr.link("get", index=peer_idx, **kw)[0]
    peer_name = pmsg.get_attr("IFLA_IFNAME")
    xdp = pmsg.get_attr("IFLA_XDP")
    if xdp is not None and xdp.get_attr("IFLA_XDP_DRV_PROG_ID"):
        return None
    where = (None, "this namespace") if nsid is None else _namespace(ipr, nsid)
    if where is None:
        kernel_says = _takes_redirects(msg["index"])
        if kernel_says:
            return None  # the peer runs NAPI: nothing to fix
        if kernel_says is False:
            raise DatapathError(
                f"{port}: veth peer {peer_name} would drop redirected frames (no XDP program, GRO off) and its "
                f"network namespace (netnsid {nsid}) cannot be entered: run `ethtool -K {peer_name} gro on` in "
                f"that namespace, or attach an XDP program to {peer_name}, then retry")
        raise DatapathError(
            f"{port}: veth peer {peer_name} has no XDP program and its network namespace (netnsid {nsid}) cannot "
            f"be entered to check its GRO: bind-mount that namespace to /run/netns/NAME and retry, "
            f"attach an XDP program to {peer_name}, or use --xdp-mode generic")
    peer = Peer(port, peer_name, *where)
    return None if _run(peer.ns_path, _gro, peer_name) else peer


def turn_gro_on(peer: Peer) -> None:
    _run(peer.ns_path, _gro, peer.name, True)
    if not _run(peer.ns_path, _gro, peer.name):
        raise DatapathError(f"{peer.port}: veth peer {peer.name} ({peer.ns_label}) keeps GRO off, so it would drop "
                            f"redirected frames: attach an XDP program to {peer.name}, or use --xdp-mode generic")


def _gro(ifname: str, on: bool | None = None) -> bool:
    with Ethtool() as e:
        features = e.get_features(ifname)
        if on is not None:
            features.features["rx-gro"].enable = on
            e.set_features(ifname, features)
            return on
        return features.features["rx-gro"].enable


def _run(ns_path: str | None, fn, *args):
    return fn(*args) if ns_path is None else netns.run_in(ns_path, fn, *args)


def _namespace(ipr: IPRoute, nsid: int) -> tuple[str, str] | None:
    """(path, label) of the namespace this one calls nsid: a named one, else
    one a process runs in (a container's); None if neither."""
    seen = set()
    for path, label in _namespace_files():
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # a process that exited
        try:
            # Asks for the id without assigning one: no side effect on other namespaces.
            found = (ipr.get_netnsid(fd=fd) or {}).get("nsid")
        finally:
            os.close(fd)
        if found == nsid:
            return path, label
    return None


def _namespace_files():
    try:
        names = sorted(os.listdir(netns.NETNS_RUN_DIR))
    except FileNotFoundError:
        names = []
    for n in names:
        yield netns.path(n), f"netns {n}"
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield f"/proc/{entry}/ns/net", f"the network namespace of pid {entry}"


class _devmsg(genlmsg):
    nla_map = (("NETDEV_A_DEV_UNSPEC", "none"), ("NETDEV_A_DEV_IFINDEX", "uint32"),
               ("NETDEV_A_DEV_PAD", "none"), ("NETDEV_A_DEV_XDP_FEATURES", "uint64"))


def _takes_redirects(ifindex: int) -> bool | None:
    """The kernel's own answer (6.4+: a veth reports ndo-xmit while its peer
    runs NAPI); None when this kernel cannot tell."""
    sock = GenericNetlinkSocket()
    try:
        sock.bind("netdev", _devmsg)
        req = _devmsg()
        req["cmd"], req["version"] = NETDEV_CMD_DEV_GET, 1
        req["attrs"] = [("NETDEV_A_DEV_IFINDEX", ifindex)]
        answer = sock.nlm_request(req, msg_type=sock.prid, msg_flags=NLM_F_REQUEST)
        return bool((answer[0].get_attr("NETDEV_A_DEV_XDP_FEATURES") or 0) & NETDEV_XDP_ACT_NDO_XMIT)
    except NetlinkError:  # no "netdev" family before 6.3
        return None
    finally:
        sock.close()
