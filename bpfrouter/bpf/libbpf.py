"""ctypes declarations for the system libbpf (1.1+). No domain knowledge here.

Only the functions bpfrouter uses are declared; each gets argtypes/restype so
a wrong call fails in Python instead of corrupting memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

c_void_p = ctypes.c_void_p
c_int = ctypes.c_int
c_uint = ctypes.c_uint32
c_char_p = ctypes.c_char_p
c_size_t = ctypes.c_size_t


class BpfError(OSError):
    """A libbpf or bpf(2) call failed; str() is one line for the user."""

    def __init__(self, what: str, err: int, detail: str = "", reason: str = ""):
        self.what = what
        self.detail = detail  # libbpf's log, e.g. the whole verifier log
        msg = f"{what}: {os.strerror(err)}" + (f": {reason}" if reason else "")
        super().__init__(err, msg)

    def __str__(self) -> str:
        return self.args[1]


def _load() -> ctypes.CDLL:
    for name in ("libbpf.so.1", ctypes.util.find_library("bpf")):
        if not name:
            continue
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
    raise ImportError("libbpf.so.1 not found: install libbpf1 (apt-get install libbpf1)")


lib = _load()

# Attach types and flags from <linux/bpf.h> / <linux/if_link.h>.
BPF_XDP = 37
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_ATTACHED = {0: "none", 1: "native", 2: "generic", 3: "offload", 4: "multi"}
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2

BTF_KIND_INT, BTF_KIND_ARRAY, BTF_KIND_STRUCT, BTF_KIND_ENUM, BTF_KIND_DATASEC = 1, 3, 4, 6, 15


class LinkCreateOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("flags", c_uint), ("_pad", ctypes.c_uint8 * 36)]


class XdpQueryOpts(ctypes.Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("prog_id", c_uint),
        ("drv_prog_id", c_uint),
        ("hw_prog_id", c_uint),
        ("skb_prog_id", c_uint),
        ("attach_mode", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 7),
    ]


class TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint),
        ("data_size_out", c_uint),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint),
        ("ctx_size_out", c_uint),
        ("retval", c_uint),
        ("repeat", c_int),
        ("duration", c_uint),
        ("flags", c_uint),
        ("cpu", c_uint),
        ("batch_size", c_uint),
    ]


class MapBatchOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class BpfMapInfo(ctypes.Structure):
    _fields_ = [
        ("type", c_uint), ("id", c_uint), ("key_size", c_uint), ("value_size", c_uint),
        ("max_entries", c_uint), ("map_flags", c_uint), ("name", ctypes.c_char * 16),
        ("ifindex", c_uint), ("btf_vmlinux_value_type_id", c_uint),
        ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("btf_id", c_uint), ("btf_key_type_id", c_uint), ("btf_value_type_id", c_uint),
        ("_pad", c_uint), ("map_extra", ctypes.c_uint64),
    ]


class BpfProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", c_uint), ("id", c_uint), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", c_uint), ("xlated_prog_len", c_uint),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", c_uint), ("nr_map_ids", c_uint),
        ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16), ("ifindex", c_uint),
        ("gpl_compatible", c_uint), ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", c_uint), ("nr_jited_func_lens", c_uint),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", c_uint), ("func_info_rec_size", c_uint), ("func_info", ctypes.c_uint64),
        ("nr_func_info", c_uint), ("nr_line_info", c_uint), ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64), ("nr_jited_line_info", c_uint),
        ("line_info_rec_size", c_uint), ("jited_line_info_rec_size", c_uint),
        ("nr_prog_tags", c_uint), ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64), ("verified_insns", c_uint),
        ("attach_btf_obj_id", c_uint), ("attach_btf_id", c_uint),
    ]


class MapCreateOpts(ctypes.Structure):
    """struct bpf_map_create_opts (libbpf 1.1)."""
    _fields_ = [("sz", c_size_t), ("btf_fd", c_uint), ("btf_key_type_id", c_uint),
                ("btf_value_type_id", c_uint), ("btf_vmlinux_value_type_id", c_uint),
                ("inner_map_fd", c_uint), ("map_flags", c_uint), ("map_extra", ctypes.c_uint64),
                ("numa_node", c_uint), ("map_ifindex", c_uint)]


class BpfLinkInfo(ctypes.Structure):
    _fields_ = [("type", c_uint), ("id", c_uint), ("prog_id", c_uint), ("_pad", c_uint),
                ("ifindex", c_uint), ("_rest", ctypes.c_uint8 * 44)]


class BtfType(ctypes.Structure):
    _fields_ = [("name_off", c_uint), ("info", c_uint), ("size", c_uint)]


class BtfMember(ctypes.Structure):
    _fields_ = [("name_off", c_uint), ("type", c_uint), ("offset", c_uint)]


class BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", c_uint), ("offset", c_uint), ("size", c_uint)]


class BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", c_uint), ("val", ctypes.c_int32)]


PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
RINGBUF_SAMPLE_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)


def _decl(name, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


bpf_object__open_file = _decl("bpf_object__open_file", c_void_p, c_char_p, c_void_p)
bpf_object__load = _decl("bpf_object__load", c_int, c_void_p)
bpf_object__close = _decl("bpf_object__close", None, c_void_p)
bpf_object__next_program = _decl("bpf_object__next_program", c_void_p, c_void_p, c_void_p)
bpf_object__next_map = _decl("bpf_object__next_map", c_void_p, c_void_p, c_void_p)
bpf_object__btf = _decl("bpf_object__btf", c_void_p, c_void_p)
bpf_program__name = _decl("bpf_program__name", c_char_p, c_void_p)
bpf_program__fd = _decl("bpf_program__fd", c_int, c_void_p)
bpf_program__set_autoload = _decl("bpf_program__set_autoload", c_int, c_void_p, ctypes.c_bool)
bpf_program__set_log_level = _decl("bpf_program__set_log_level", c_int, c_void_p, c_uint)
bpf_program__set_log_buf = _decl("bpf_program__set_log_buf", c_int, c_void_p, c_void_p, c_size_t)
bpf_map__name = _decl("bpf_map__name", c_char_p, c_void_p)
bpf_map__fd = _decl("bpf_map__fd", c_int, c_void_p)
bpf_map__initial_value = _decl("bpf_map__initial_value", c_void_p, c_void_p,
                               ctypes.POINTER(c_size_t))
bpf_map__reuse_fd = _decl("bpf_map__reuse_fd", c_int, c_void_p, c_int)
bpf_map__set_max_entries = _decl("bpf_map__set_max_entries", c_int, c_void_p, c_uint)
bpf_map__set_value_size = _decl("bpf_map__set_value_size", c_int, c_void_p, c_uint)
bpf_map__value_size = _decl("bpf_map__value_size", c_uint, c_void_p)

btf__parse_elf = _decl("btf__parse_elf", c_void_p, c_char_p, c_void_p)
btf__free = _decl("btf__free", None, c_void_p)
btf__find_by_name_kind = _decl("btf__find_by_name_kind", ctypes.c_int32, c_void_p, c_char_p, c_uint)
btf__type_by_id = _decl("btf__type_by_id", ctypes.POINTER(BtfType), c_void_p, c_uint)
btf__name_by_offset = _decl("btf__name_by_offset", c_char_p, c_void_p, c_uint)
btf__resolve_size = _decl("btf__resolve_size", ctypes.c_int64, c_void_p, c_uint)

bpf_map_create = _decl("bpf_map_create", c_int, c_int, c_char_p, c_uint, c_uint, c_uint,
                        ctypes.POINTER(MapCreateOpts))
bpf_map_lookup_elem = _decl("bpf_map_lookup_elem", c_int, c_int, c_void_p, c_void_p)
bpf_map_update_elem = _decl("bpf_map_update_elem", c_int, c_int, c_void_p, c_void_p, ctypes.c_uint64)
bpf_map_delete_elem = _decl("bpf_map_delete_elem", c_int, c_int, c_void_p)
bpf_map_get_next_key = _decl("bpf_map_get_next_key", c_int, c_int, c_void_p, c_void_p)
bpf_map_lookup_batch = _decl("bpf_map_lookup_batch", c_int, c_int, c_void_p, c_void_p, c_void_p,
                             c_void_p, ctypes.POINTER(c_uint), c_void_p)
bpf_map_update_batch = _decl("bpf_map_update_batch", c_int, c_int, c_void_p, c_void_p,
                             ctypes.POINTER(c_uint), c_void_p)
bpf_map_delete_batch = _decl("bpf_map_delete_batch", c_int, c_int, c_void_p,
                             ctypes.POINTER(c_uint), c_void_p)
bpf_obj_get = _decl("bpf_obj_get", c_int, c_char_p)
bpf_obj_pin = _decl("bpf_obj_pin", c_int, c_int, c_char_p)
bpf_obj_get_info_by_fd = _decl("bpf_obj_get_info_by_fd", c_int, c_int, c_void_p, ctypes.POINTER(c_uint))
bpf_prog_get_fd_by_id = _decl("bpf_prog_get_fd_by_id", c_int, c_uint)
bpf_link_create = _decl("bpf_link_create", c_int, c_int, c_int, c_int, ctypes.POINTER(LinkCreateOpts))
bpf_link_update = _decl("bpf_link_update", c_int, c_int, c_int, c_void_p)
bpf_link_detach = _decl("bpf_link_detach", c_int, c_int)
bpf_xdp_query = _decl("bpf_xdp_query", c_int, c_int, c_int, ctypes.POINTER(XdpQueryOpts))
bpf_prog_test_run_opts = _decl("bpf_prog_test_run_opts", c_int, c_int, ctypes.POINTER(TestRunOpts))
libbpf_num_possible_cpus = _decl("libbpf_num_possible_cpus", c_int)
libbpf_set_print = _decl("libbpf_set_print", c_void_p, PRINT_FN)

ring_buffer__new = _decl("ring_buffer__new", c_void_p, c_int, RINGBUF_SAMPLE_FN, c_void_p, c_void_p)
ring_buffer__poll = _decl("ring_buffer__poll", c_int, c_void_p, c_int)
ring_buffer__free = _decl("ring_buffer__free", None, c_void_p)


def check(rc: int, what: str) -> int:
    """Raise BpfError for a negative libbpf return code (libbpf 1.0 convention)."""
    if rc < 0:
        raise BpfError(what, -rc if rc != -1 else (ctypes.get_errno() or 1))
    return rc


def check_ptr(ptr, what: str):
    if not ptr:
        raise BpfError(what, ctypes.get_errno() or 22)
    return ptr

# tp_btf/raw_tp attachment; returns a bpf_link fd (pinnable)
bpf_raw_tracepoint_open = _decl("bpf_raw_tracepoint_open", c_int, c_char_p, c_int)
