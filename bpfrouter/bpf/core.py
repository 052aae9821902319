"""Typed Python objects over libbpf: BpfObject, Program, Map, Link, Btf, RingBuffer."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

from . import libbpf as L
from .libbpf import BpfError

K = TypeVar("K", bound=ctypes._SimpleCData | ctypes.Structure)
V = TypeVar("V", bound=ctypes._SimpleCData | ctypes.Structure)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.vasprintf.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_void_p]
_libc.free.argtypes = [ctypes.c_void_p]

_log_lock = threading.Lock()
_log_lines: list[str] = []


@L.PRINT_FN
def _print_cb(level, fmt, args):
    # vasprintf: a verifier log is one message, often far over any fixed buffer
    out = ctypes.c_void_p()
    if _libc.vasprintf(ctypes.byref(out), fmt, args) < 0:
        return 0
    try:
        text = ctypes.string_at(out.value).decode(errors="replace")
    finally:
        _libc.free(out)
    with _log_lock:
        _log_lines.append(text)
    return 0


L.libbpf_set_print(_print_cb)


def take_log() -> str:
    """libbpf's messages (including the verifier log) since the last call."""
    with _log_lock:
        text = "".join(_log_lines)
        _log_lines.clear()
    return text


_NOT_VERDICT = ("libbpf:", "processed ", "verification time", "stack depth", "-- ")


def verifier_verdict(log: str) -> str:
    """The verifier's own reason for a rejection: the last line of its log
    before the statistics and libbpf's wrapping."""
    lines = [line.strip() for line in log.splitlines()]
    lines = [line for line in lines if line and not line.startswith(_NOT_VERDICT)]
    return lines[-1] if lines else "no verifier log"


_PROG_FAILED = re.compile(r"^libbpf: prog '([^']+)': (?:BPF program load failed|failed to load)", re.M)


def load_failure(log: str) -> tuple[str | None, str]:
    """What a failed object load stopped at, from libbpf's log: (the program
    the kernel refused, the verifier's reason), or (None, libbpf's last
    complaint) when no program was refused, e.g. a map it could not create."""
    m = _PROG_FAILED.search(log)
    if m:
        return m.group(1), verifier_verdict(log)
    lines = [line.strip().removeprefix("libbpf: ") for line in log.splitlines()
             if line.startswith("libbpf: ") and ("fail" in line or "rror" in line)
             and "failed to load object" not in line]
    return None, lines[-1] if lines else "no log from libbpf"


def possible_cpus() -> int:
    return L.check(L.libbpf_num_possible_cpus(), "possible CPUs")


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class Map(Generic[K, V]):
    """A BPF map addressed by fd, with ctypes key and value types.

    For per-CPU maps, values are lists (one per possible CPU)."""

    PERCPU_TYPES = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH

    def __init__(self, fd: int, key_type: type[K], value_type: type[V] | None, name: str = "",
                 owns_fd: bool = True):
        self.fd = fd
        self._owns_fd = owns_fd
        self.info = map_info(fd)
        if value_type is None:  # raw bytes, as many as the map was created with
            value_type = ctypes.c_uint8 * self.info.value_size  # type: ignore[assignment]
        self.key_type = key_type
        self.value_type = value_type
        self.name = name or self.info.name.decode()
        self.percpu = self.info.type in self.PERCPU_TYPES
        self.ncpus = possible_cpus() if self.percpu else 1
        if ctypes.sizeof(key_type) != self.info.key_size:
            raise BpfError(f"map {self.name}: key is {self.info.key_size} bytes, "
                           f"Python layout {key_type.__name__} is {ctypes.sizeof(key_type)}", 22)
        if ctypes.sizeof(value_type) != self.info.value_size:
            raise BpfError(f"map {self.name}: value is {self.info.value_size} bytes, "
                           f"Python layout {value_type.__name__} is {ctypes.sizeof(value_type)}", 22)
        self._value_stride = (ctypes.sizeof(value_type) + 7) & ~7 if self.percpu else ctypes.sizeof(value_type)

    @classmethod
    def pinned(cls, path: str, key_type: type[K], value_type: type[V] | None) -> "Map[K, V]":
        fd = L.bpf_obj_get(path.encode())
        if fd < 0:
            raise BpfError(f"open pinned map {path}", -fd)
        return cls(fd, key_type, value_type)

    @property
    def max_entries(self) -> int:
        return self.info.max_entries

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            _close(self.fd)
        self.fd = -1

    def _value_buf(self):
        return (ctypes.c_uint8 * (self._value_stride * self.ncpus))()

    def _decode(self, buf) -> V | list[V]:
        if not self.percpu:
            return self.value_type.from_buffer_copy(buf)
        return [self.value_type.from_buffer_copy(buf, i * self._value_stride) for i in range(self.ncpus)]

    def lookup(self, key: K) -> V | list[V] | None:
        buf = self._value_buf()
        rc = L.bpf_map_lookup_elem(self.fd, ctypes.byref(key), buf)
        if rc == -2:  # ENOENT
            return None
        L.check(rc, f"lookup in map {self.name}")
        return self._decode(buf)

    def update(self, key: K, value: V, flags: int = L.BPF_ANY) -> None:
        L.check(L.bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), flags),
                f"update map {self.name}")

    def zero(self, key: K) -> None:
        """Set the entry to zero bytes (on every CPU, for a per-CPU map)."""
        L.check(L.bpf_map_update_elem(self.fd, ctypes.byref(key), self._value_buf(), L.BPF_ANY),
                f"update map {self.name}")

    def delete(self, key: K) -> bool:
        rc = L.bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if rc == -2:
            return False
        L.check(rc, f"delete from map {self.name}")
        return True

    def keys(self) -> Iterator[K]:
        key = self.key_type()
        nxt = self.key_type()
        prev = None
        while True:
            rc = L.bpf_map_get_next_key(self.fd, prev, ctypes.byref(nxt))
            if rc == -2:
                return
            L.check(rc, f"iterate map {self.name}")
            yield self.key_type.from_buffer_copy(nxt)
            ctypes.memmove(ctypes.byref(key), ctypes.byref(nxt), ctypes.sizeof(key))
            prev = ctypes.byref(key)

    def items(self) -> Iterator[tuple[K, V | list[V]]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def lookup_batch(self, chunk: int = 4096) -> list[tuple[K, V | list[V]]]:
        """All entries through BPF_MAP_LOOKUP_BATCH (falls back to iteration)."""
        out: list = []
        ksz, vsz = ctypes.sizeof(self.key_type), self._value_stride * self.ncpus
        keys = (ctypes.c_uint8 * (ksz * chunk))()
        vals = (ctypes.c_uint8 * (vsz * chunk))()
        in_batch = ctypes.c_uint64(0)
        out_batch = ctypes.c_uint64(0)
        first = True
        opts = L.MapBatchOpts(sz=ctypes.sizeof(L.MapBatchOpts))
        while True:
            count = ctypes.c_uint32(chunk)
            rc = L.bpf_map_lookup_batch(self.fd, None if first else ctypes.byref(in_batch),
                                        ctypes.byref(out_batch), keys, vals, ctypes.byref(count),
                                        ctypes.byref(opts))
            if rc < 0 and rc not in (-2,):
                if first and rc in (-22, -95, -524):  # not supported by this map type
                    return list(self.items())
                L.check(rc, f"batch lookup in map {self.name}")
            for i in range(count.value):
                k = self.key_type.from_buffer_copy(keys, i * ksz)
                v = self._decode((ctypes.c_uint8 * vsz).from_buffer(vals, i * vsz))
                out.append((k, v))
            if rc == -2:
                return out
            in_batch.value = out_batch.value
            first = False

    def update_batch(self, pairs: list[tuple[K, V]], flags: int = L.BPF_ANY) -> None:
        if not pairs:
            return
        n = len(pairs)
        keys = (self.key_type * n)(*[k for k, _ in pairs])
        vals = (self.value_type * n)(*[v for _, v in pairs])
        count = ctypes.c_uint32(n)
        opts = L.MapBatchOpts(sz=ctypes.sizeof(L.MapBatchOpts), elem_flags=flags)
        rc = L.bpf_map_update_batch(self.fd, keys, vals, ctypes.byref(count), ctypes.byref(opts))
        if rc in (-22, -95, -524) and count.value == 0:
            for k, v in pairs:  # map type without batch ops
                self.update(k, v, flags)
            return
        L.check(rc, f"batch update of map {self.name}")

    def delete_batch(self, keys_list: list[K]) -> None:
        if not keys_list:
            return
        n = len(keys_list)
        keys = (self.key_type * n)(*keys_list)
        count = ctypes.c_uint32(n)
        opts = L.MapBatchOpts(sz=ctypes.sizeof(L.MapBatchOpts))
        rc = L.bpf_map_delete_batch(self.fd, keys, ctypes.byref(count), ctypes.byref(opts))
        if rc < 0:
            for k in keys_list[count.value:]:
                self.delete(k)

    def count(self) -> int:
        return sum(1 for _ in self.keys())

    def mmap(self) -> mmap.mmap:
        """The values of a BPF_F_MMAPABLE array, shared with the kernel."""
        size = self.info.max_entries * ((self.info.value_size + 7) & ~7)
        size = (size + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
        try:
            return mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise BpfError(f"mmap map {self.name}", e.errno or 22) from None


def map_info(fd: int) -> L.BpfMapInfo:
    info = L.BpfMapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    L.check(L.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return info


def prog_info(fd: int) -> L.BpfProgInfo:
    info = L.BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    L.check(L.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program info")
    return info


def prog_map_ids(fd: int) -> list[int]:
    """Ids of the maps a loaded program uses."""
    n = prog_info(fd).nr_map_ids
    ids = (ctypes.c_uint32 * max(n, 1))()
    info = L.BpfProgInfo(nr_map_ids=n, map_ids=ctypes.addressof(ids))
    size = ctypes.c_uint32(ctypes.sizeof(info))
    L.check(L.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program map ids")
    return list(ids[:min(n, info.nr_map_ids)])


def prog_xlated(fd: int) -> bytes:
    """A loaded program's instructions after the verifier's rewrites."""
    n = prog_info(fd).xlated_prog_len
    buf = ctypes.create_string_buffer(max(n, 1))
    info = L.BpfProgInfo(xlated_prog_len=n, xlated_prog_insns=ctypes.addressof(buf))
    size = ctypes.c_uint32(ctypes.sizeof(info))
    L.check(L.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program instructions")
    return buf.raw[:min(n, info.xlated_prog_len)]


def link_info(fd: int) -> L.BpfLinkInfo:
    info = L.BpfLinkInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    L.check(L.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "link info")
    return info


@dataclass
class TestRunResult:
    retval: int
    data: bytes
    duration_ns: int
    meta: bytes = b""



class XdpMd(ctypes.Structure):
    """struct xdp_md, the context BPF_PROG_TEST_RUN takes and returns."""
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("data", "data_end", "data_meta", "ingress_ifindex", "rx_queue_index", "egress_ifindex")]

class Program:
    def __init__(self, fd: int, name: str = "", owns_fd: bool = False):
        self.fd = fd
        self.name = name
        self._owns_fd = owns_fd

    @classmethod
    def pinned(cls, path: str) -> "Program":
        fd = L.bpf_obj_get(path.encode())
        if fd < 0:
            raise BpfError(f"open pinned program {path}", -fd)
        return cls(fd, os.path.basename(path), owns_fd=True)

    @classmethod
    def from_id(cls, prog_id: int) -> "Program":
        fd = L.bpf_prog_get_fd_by_id(prog_id)
        if fd < 0:
            raise BpfError(f"open program id {prog_id}", -fd)
        return cls(fd, owns_fd=True)

    @property
    def id(self) -> int:
        return prog_info(self.fd).id

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            _close(self.fd)
        self.fd = -1

    def test_run(self, data: bytes, *, ingress_ifindex: int = 0, meta: bytes = b"",
                 repeat: int = 1, flags: int = 0, batch_size: int = 0,
                 out_size: int | None = None) -> TestRunResult:
        """BPF_PROG_TEST_RUN on an XDP program. `meta` goes into the XDP
        metadata area in front of the packet and is returned (as rewritten
        by the program) in TestRunResult.meta."""
        if len(meta) % 4:
            raise ValueError("XDP metadata length must be a multiple of 4")
        data_in = meta + data
        in_buf = ctypes.create_string_buffer(data_in, len(data_in))
        live = bool(flags & L.BPF_F_TEST_XDP_LIVE_FRAMES)
        out_len = 0 if live else (out_size or len(data_in) + 256)
        out_buf = ctypes.create_string_buffer(out_len) if out_len else None
        ctx_in = XdpMd(data=len(meta), data_end=len(data_in), ingress_ifindex=ingress_ifindex)
        ctx_out = XdpMd()
        opts = L.TestRunOpts(
            sz=ctypes.sizeof(L.TestRunOpts),
            data_in=ctypes.cast(in_buf, ctypes.c_void_p),
            data_out=ctypes.cast(out_buf, ctypes.c_void_p) if out_buf else None,
            data_size_in=len(data_in), data_size_out=out_len,
            ctx_in=ctypes.addressof(ctx_in), ctx_size_in=ctypes.sizeof(ctx_in),
            ctx_out=None if live else ctypes.addressof(ctx_out),
            ctx_size_out=0 if live else ctypes.sizeof(ctx_out),
            repeat=repeat, flags=flags, batch_size=batch_size,
        )
        L.check(L.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts)), f"test run of {self.name or 'program'}")
        raw = out_buf.raw[: opts.data_size_out] if out_buf else b""
        mlen = ctx_out.data if not live else 0
        return TestRunResult(opts.retval, raw[mlen:], opts.duration, raw[:mlen])


class Link:
    """A bpf_link (XDP attachment). Pinning keeps it alive after we exit."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def create_xdp(cls, prog: Program, ifindex: int, flags: int = 0) -> "Link":
        opts = L.LinkCreateOpts(sz=16, flags=flags)
        fd = L.bpf_link_create(prog.fd, ifindex, L.BPF_XDP, ctypes.byref(opts))
        if fd < 0:
            raise BpfError(f"attach XDP to ifindex {ifindex}", -fd)
        return cls(fd)

    @classmethod
    def create_tracing(cls, prog: Program) -> "Link":
        """Attach a tp_btf program to the tracepoint it was loaded for."""
        fd = L.bpf_raw_tracepoint_open(None, prog.fd)
        if fd < 0:
            raise BpfError(f"attach tracing program {prog.name}", -fd)
        return cls(fd)

    @classmethod
    def pinned(cls, path: str) -> "Link":
        fd = L.bpf_obj_get(path.encode())
        if fd < 0:
            raise BpfError(f"open pinned link {path}", -fd)
        return cls(fd)

    def pin(self, path: str) -> None:
        L.check(L.bpf_obj_pin(self.fd, path.encode()), f"pin link at {path}")

    def info(self) -> L.BpfLinkInfo:
        return link_info(self.fd)

    def update(self, prog: "Program") -> None:
        """Swap the attached program; atomic: each packet runs the old or the new one."""
        L.check(L.bpf_link_update(self.fd, prog.fd, None), f"swap the program of link {self.info().id}")

    def detach(self) -> None:
        L.bpf_link_detach(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            _close(self.fd)
        self.fd = -1


def xdp_query(ifindex: int) -> tuple[str, int]:
    """(attach mode, program id) of the XDP program on an interface."""
    opts = L.XdpQueryOpts(sz=ctypes.sizeof(L.XdpQueryOpts))
    L.check(L.bpf_xdp_query(ifindex, 0, ctypes.byref(opts)), f"query XDP on ifindex {ifindex}")
    return L.XDP_ATTACHED.get(opts.attach_mode, "unknown"), opts.prog_id


def pin_object(fd: int, path: str) -> None:
    L.check(L.bpf_obj_pin(fd, path.encode()), f"pin at {path}")


class BpfObject:
    """An ELF BPF object: open, adjust read-only data, load, find programs and maps."""

    def __init__(self, path: str):
        self.path = path
        take_log()
        ptr = L.bpf_object__open_file(path.encode(), None)
        if not ptr:
            raise BpfError(f"open BPF object {path}", ctypes.get_errno() or 2, take_log())
        self._obj = ptr
        self.loaded = False

    def _maps_raw(self) -> Iterator[tuple[str, int]]:
        m = L.bpf_object__next_map(self._obj, None)
        while m:
            yield L.bpf_map__name(m).decode(), m
            m = L.bpf_object__next_map(self._obj, m)

    def _progs_raw(self) -> Iterator[tuple[str, int]]:
        p = L.bpf_object__next_program(self._obj, None)
        while p:
            yield L.bpf_program__name(p).decode(), p
            p = L.bpf_object__next_program(self._obj, p)

    def rodata(self) -> ctypes.Array:
        """The writable initial image of .rodata (const volatile globals); before load only."""
        for name, m in self._maps_raw():
            if name.endswith(".rodata"):
                size = ctypes.c_size_t()
                ptr = L.bpf_map__initial_value(m, ctypes.byref(size))
                return (ctypes.c_uint8 * size.value).from_address(ptr)
        raise KeyError(".rodata")

    def set_rodata(self, var: str, value: ctypes._SimpleCData) -> None:
        """Set a `const volatile` global before load (the verifier then prunes on it)."""
        btf = L.bpf_object__btf(self._obj)
        sec_id = L.btf__find_by_name_kind(btf, b".rodata", L.BTF_KIND_DATASEC)
        if sec_id < 0:
            raise KeyError(".rodata")
        t = L.btf__type_by_id(btf, sec_id).contents
        infos = ctypes.cast(ctypes.addressof(t) + ctypes.sizeof(L.BtfType),
                            ctypes.POINTER(L.BtfVarSecinfo))
        for i in range(t.info & 0xFFFF):
            v = L.btf__type_by_id(btf, infos[i].type).contents
            if L.btf__name_by_offset(btf, v.name_off).decode() == var:
                if infos[i].size != ctypes.sizeof(value):
                    raise ValueError(f"{var} is {infos[i].size} bytes")
                ctypes.memmove(ctypes.addressof(self.rodata()) + infos[i].offset,
                               ctypes.byref(value), infos[i].size)
                return
        raise KeyError(var)

    def _map_raw(self, name: str) -> int:
        for mname, m in self._maps_raw():
            if mname == name:
                return m
        raise KeyError(name)

    def set_max_entries(self, name: str, n: int) -> None:
        L.check(L.bpf_map__set_max_entries(self._map_raw(name), n), f"resize map {name}")

    def set_value_size(self, name: str, n: int) -> None:
        """Only for maps defined by size (value_size), not by a BTF type."""
        L.check(L.bpf_map__set_value_size(self._map_raw(name), n), f"resize map {name}'s value")

    def value_size(self, name: str) -> int:
        return L.bpf_map__value_size(self._map_raw(name))

    def reuse_map(self, name: str, fd: int) -> None:
        L.check(L.bpf_map__reuse_fd(self._map_raw(name), fd), f"reuse map {name}")

    def only_programs(self, *names: str) -> None:
        for n, p in self._progs_raw():
            L.bpf_program__set_autoload(p, n in names)

    def keep_verifier_stats(self, size: int = 1 << 16) -> None:
        """Before load: have the verifier write its statistics (BPF_LOG_STATS:
        instructions processed, stack depth per function) for every program,
        read back with verifier_stats()."""
        self._stats_bufs = {}
        for n, p in self._progs_raw():
            buf = ctypes.create_string_buffer(size)
            L.check(L.bpf_program__set_log_buf(p, buf, size), f"log buffer of {n}")
            L.check(L.bpf_program__set_log_level(p, 4), f"log level of {n}")
            self._stats_bufs[n] = buf

    def verifier_stats(self, name: str) -> str:
        """The verifier's statistics for a loaded program (keep_verifier_stats)."""
        return self._stats_bufs[name].value.decode(errors="replace")

    def load(self) -> None:
        take_log()
        rc = L.bpf_object__load(self._obj)
        if rc < 0:
            log = take_log()
            prog, reason = load_failure(log)
            raise BpfError(f"load BPF object {os.path.basename(self.path)}" + (f", program {prog}" if prog else ""),
                           -rc, log, reason)
        self.loaded = True

    def program(self, name: str) -> Program:
        for n, p in self._progs_raw():
            if n == name:
                return Program(L.bpf_program__fd(p), n)
        raise KeyError(f"no program {name} in {self.path}")

    def map_fd(self, name: str) -> int:
        for n, m in self._maps_raw():
            if n == name:
                return L.bpf_map__fd(m)
        raise KeyError(f"no map {name} in {self.path}")

    def map(self, name: str, key_type, value_type) -> Map:
        return Map(self.map_fd(name), key_type, value_type, name, owns_fd=False)

    def program_names(self) -> list[str]:
        return [n for n, _ in self._progs_raw()]

    def map_names(self) -> list[str]:
        return [n for n, _ in self._maps_raw() if not n.startswith(".") and "." not in n]

    def close(self) -> None:
        if self._obj:
            L.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class BtfMemberInfo:
    name: str
    offset: int  # bytes
    size: int


class Btf:
    """Read-only view of an object file's BTF: struct layouts and enums."""

    def __init__(self, elf_path: str):
        ptr = L.btf__parse_elf(elf_path.encode(), None)
        if not ptr:
            raise BpfError(f"read BTF of {elf_path}", ctypes.get_errno() or 22)
        self._btf = ptr

    def close(self) -> None:
        if self._btf:
            L.btf__free(self._btf)
            self._btf = None

    def _find(self, name: str, kind: int) -> tuple[int, L.BtfType]:
        tid = L.btf__find_by_name_kind(self._btf, name.encode(), kind)
        if tid < 0:
            raise KeyError(name)
        return tid, L.btf__type_by_id(self._btf, tid).contents

    def struct(self, name: str) -> tuple[int, list[BtfMemberInfo]]:
        tid, t = self._find(name, L.BTF_KIND_STRUCT)
        vlen = t.info & 0xFFFF
        kflag = t.info >> 31
        members_ptr = ctypes.cast(ctypes.addressof(t) + ctypes.sizeof(L.BtfType),
                                  ctypes.POINTER(L.BtfMember))
        members = []
        for i in range(vlen):
            m = members_ptr[i]
            bit_off = m.offset & 0xFFFFFF if kflag else m.offset
            members.append(BtfMemberInfo(
                L.btf__name_by_offset(self._btf, m.name_off).decode(),
                bit_off // 8, L.btf__resolve_size(self._btf, m.type)))
        return t.size, members

    def enum(self, name: str) -> dict[str, int]:
        _, t = self._find(name, L.BTF_KIND_ENUM)
        vlen = t.info & 0xFFFF
        vals = ctypes.cast(ctypes.addressof(t) + ctypes.sizeof(L.BtfType), ctypes.POINTER(L.BtfEnum))
        return {L.btf__name_by_offset(self._btf, vals[i].name_off).decode(): vals[i].val
                for i in range(vlen)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RingBuffer:
    """Consumes a BPF ring buffer map; callback(bytes) per record. An
    exception raised by the callback stops the poll and is raised by poll()."""

    _STOP = -errno.ECANCELED  # returned to libbpf, which ends the poll with it

    def __init__(self, map_fd: int, callback: Callable[[bytes], None]):
        self._error: BaseException | None = None

        def _cb(_ctx, data, size):
            # an exception can't cross libbpf's C frames (ctypes would print it and
            # return garbage): keep it for poll() and make libbpf stop
            try:
                callback(ctypes.string_at(data, size))
            except BaseException as e:
                self._error = e
                return self._STOP
            return 0
        self._cb = L.RINGBUF_SAMPLE_FN(_cb)  # keep a reference for libbpf
        self._rb = L.check_ptr(L.ring_buffer__new(map_fd, self._cb, None, None), "open ring buffer")

    def poll(self, timeout_ms: int = 100) -> int:
        """Records consumed; the failing one is consumed too, those after it wait for the next poll."""
        rc = L.ring_buffer__poll(self._rb, timeout_ms)
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if rc == -4:  # EINTR
            return 0
        return L.check(rc, "poll ring buffer")

    def close(self) -> None:
        if self._rb:
            L.ring_buffer__free(self._rb)
            self._rb = None
