"""The libbpf binding on real maps: single and batch operations, iteration,
per-CPU values, pinning, ring buffers, BTF."""
import ctypes
import os
import re
import subprocess

import pytest

from bpfrouter.bpf import BpfError, BpfObject, Btf, Map, RingBuffer, pin_object, possible_cpus
from tests.conftest import ROOT

SELFTEST = str(ROOT / "build" / "selftest.bpf.o")


class Pair(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint16), ("c", ctypes.c_uint16)]


@pytest.fixture
def obj():
    o = BpfObject(SELFTEST)
    o.load()
    yield o
    o.close()


def test_single_ops_and_iteration(obj):
    m = obj.map("hash", ctypes.c_uint32, Pair)
    assert m.lookup(ctypes.c_uint32(7)) is None
    m.update(ctypes.c_uint32(7), Pair(1, 2, 3))
    got = m.lookup(ctypes.c_uint32(7))
    assert (got.a, got.b, got.c) == (1, 2, 3)
    assert m.delete(ctypes.c_uint32(7)) and not m.delete(ctypes.c_uint32(7))
    for i in range(10):
        m.update(ctypes.c_uint32(i), Pair(i, 0, 0))
    assert sorted(k.value for k in m.keys()) == list(range(10))
    assert {k.value: v.a for k, v in m.items()} == {i: i for i in range(10)}


def test_batch_ops(obj):
    m = obj.map("hash", ctypes.c_uint32, Pair)
    m.update_batch([(ctypes.c_uint32(i), Pair(i * 2, 0, 0)) for i in range(600)])
    rows = m.lookup_batch(chunk=128)
    assert len(rows) == 600 and {k.value: v.a for k, v in rows} == {i: i * 2 for i in range(600)}
    m.delete_batch([ctypes.c_uint32(i) for i in range(300)])
    assert m.count() == 300


def test_wrong_layout_is_refused(obj):
    with pytest.raises(BpfError, match="value is 8 bytes"):
        obj.map("hash", ctypes.c_uint32, ctypes.c_uint32)


def test_percpu_values_and_ringbuf(obj):
    percpu = obj.map("percpu", ctypes.c_uint32, ctypes.c_uint32)
    assert len(percpu.lookup(ctypes.c_uint32(0))) == possible_cpus()
    seen = []
    rb = RingBuffer(obj.map_fd("events"), lambda data: seen.append(int.from_bytes(data, "little")))
    prog = obj.program("xdp_emit_len")
    for size in (60, 100, 1500):
        assert prog.test_run(bytes(size)).retval == 2
    assert rb.poll(100) == 3
    rb.close()
    assert seen == [60, 100, 1500]
    assert sum(v.value for v in percpu.lookup(ctypes.c_uint32(0))) == 3


def test_pin_and_reopen(obj, tmp_path):
    path = f"/sys/fs/bpf/bpfrouter-selftest-{os.getpid()}"
    pin_object(obj.map_fd("hash"), path)
    try:
        m = Map.pinned(path, ctypes.c_uint32, Pair)
        m.update(ctypes.c_uint32(1), Pair(42, 0, 0))
        assert obj.map("hash", ctypes.c_uint32, Pair).lookup(ctypes.c_uint32(1)).a == 42
        m.close()
    finally:
        os.unlink(path)
    with pytest.raises(BpfError, match="No such file"):
        Map.pinned(path, ctypes.c_uint32, Pair)


def test_btf_struct_layout():
    with Btf(SELFTEST) as btf:
        size, members = btf.struct("pair")
    assert size == 8 and [(m.name, m.offset, m.size) for m in members] == [("a", 0, 4), ("b", 4, 2), ("c", 6, 2)]


def test_an_exception_in_the_ringbuf_callback_reaches_the_caller_of_poll(obj):
    seen = []

    def on_record(data: bytes) -> None:
        n = int.from_bytes(data, "little")
        if n == 60:
            raise ValueError(f"bad record {n}")
        seen.append(n)

    rb = RingBuffer(obj.map_fd("events"), on_record)
    prog = obj.program("xdp_emit_len")
    for size in (60, 100):
        prog.test_run(bytes(size))
    with pytest.raises(ValueError, match="^bad record 60$"):
        rb.poll(100)
    assert rb.poll(100) == 1 and seen == [100]  # the record after the failing one waited for this poll
    rb.close()


REJECTED = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_fine(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/* reads the packet without checking it is that long: the verifier refuses it */
SEC("xdp")
int xdp_unchecked_read(struct xdp_md *ctx)
{
	unsigned char *data = (void *)(long)ctx->data;

	return data[20] == 1 ? XDP_DROP : XDP_PASS;
}

char _license[] SEC("license") = "GPL";
"""


def test_a_rejected_program_is_named_with_the_verifiers_reason(tmp_path):
    src, elf = tmp_path / "rejected.bpf.c", tmp_path / "rejected.bpf.o"
    src.write_text(REJECTED)
    subprocess.run([os.environ.get("CLANG", "clang-19"), "-target", "bpf", "-O2", "-g",
                    f"-I/usr/include/{os.uname().machine}-linux-gnu", "-c", str(src), "-o", str(elf)], check=True)
    with BpfObject(str(elf)) as o, pytest.raises(BpfError) as e:
        o.load()
    assert re.fullmatch(r"load BPF object rejected\.bpf\.o, program xdp_unchecked_read: Permission denied: "
                        r"R\d offset is outside of the packet", str(e.value)), str(e.value)
    assert "-- BEGIN PROG LOAD LOG --" in e.value.detail  # the whole log stays at hand
