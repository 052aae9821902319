from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from bpfrouter.packet import mac_bytes, mac_str, udp_probe


def _valid(pkt, layer):
    sent = (pkt[layer].chksum if layer is IP else None, pkt[UDP].chksum)
    if layer is IP:
        del pkt[IP].chksum
    del pkt[UDP].chksum
    again = Ether(bytes(pkt))
    return sent == ((again[IP].chksum if layer is IP else None), again[UDP].chksum)


def test_ipv4_probe_checksums_match_scapy():
    pkt = Ether(udp_probe("192.0.2.1", "10.0.0.1", mac_bytes("02:00:00:00:00:aa"), ttl=7, payload=b"xyz"))
    assert pkt.dst == "02:00:00:00:00:aa" and pkt[IP].ttl == 7 and pkt[IP].dst == "10.0.0.1"
    assert _valid(pkt, IP)


def test_ipv6_probe_checksums_match_scapy():
    pkt = Ether(udp_probe("2001:db8::1", "fd00::2", b"\x02" * 6, ttl=9))
    assert pkt[IPv6].hlim == 9 and pkt[IPv6].dst == "fd00::2" and pkt[IPv6].plen == 8
    assert _valid(pkt, IPv6)


def test_mac_roundtrip():
    assert mac_str(mac_bytes("0a:1b:2c:3d:4e:5f")) == "0a:1b:2c:3d:4e:5f"
