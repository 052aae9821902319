"""`bpfrouter capture -w FILE`: real lab traffic written to pcap and to pcapng,
read back with tshark (issue 20: a capture once wrote 0 packets when scapy
changed a private method)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

MAGIC = {".pcap": b"\xd4\xc3\xb2\xa1", ".pcapng": b"\x0a\x0d\x0d\x0a"}  # pcap as written on little-endian x86


@pytest.mark.parametrize("suffix", [".pcap", ".pcapng"])
def test_capture_writes_the_packets_to_pcap_and_pcapng(bpf_router, tmp_path, suffix):
    r = bpf_router
    h1, h2 = r.lab.addr("h1"), r.lab.addr("h2")
    assert r.ping("h1", h2, count=1)  # the neighbors are resolved: what follows is redirected
    path = tmp_path / f"x{suffix}"
    proc = subprocess.Popen([sys.executable, "-m", "bpfrouter", "capture", "-w", str(path), "-c", "4",
                             "--duration", "20", "--name", r.name, "icmp"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    assert "Ctrl-C" in first, f"capture did not start: {first}{proc.stderr.read() if proc.poll() else ''}"
    assert r.ping("h1", h2, count=2)  # 2 requests and 2 replies
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "4 packets captured" in err, err
    assert path.read_bytes()[:4] == MAGIC[suffix]
    fields = ["ip.src", "ip.dst", "icmp.type", "frame.len", "frame.interface_name", "frame.comment"]
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", *[a for f in fields for a in ("-e", f)]],
                         capture_output=True, text=True, check=True).stdout
    rows = sorted(line.split("\t") for line in out.splitlines())
    if suffix == ".pcapng":  # the interface and the verdict travel with each packet
        there = [h1, h2, "8", "98", "r-eth0", "bpfrouter: redirect ipv4 xdp redirect egress r-eth1"]
        back = [h2, h1, "0", "98", "r-eth1", "bpfrouter: redirect ipv4 xdp redirect egress r-eth0"]
    else:  # classic pcap has neither
        there, back = [h1, h2, "8", "98", "", ""], [h2, h1, "0", "98", "", ""]
    assert rows == sorted([there, there, back, back])
