"""Layer 0: a thin typed binding over the system libbpf. No routing knowledge."""
from .core import (Btf, BpfObject, Link, Map, Program, RingBuffer, TestRunResult, pin_object,
                   possible_cpus, prog_info, prog_map_ids, prog_xlated, link_info, load_failure, map_info, take_log,
                   verifier_verdict, xdp_query)
from .libbpf import BpfError, XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE, BPF_F_TEST_XDP_LIVE_FRAMES

__all__ = ["Btf", "BpfObject", "BpfError", "Link", "Map", "Program", "RingBuffer",
           "TestRunResult", "pin_object", "possible_cpus", "prog_info", "prog_map_ids", "prog_xlated", "link_info",
           "load_failure", "map_info", "take_log", "verifier_verdict", "xdp_query", "XDP_FLAGS_DRV_MODE", "XDP_FLAGS_SKB_MODE",
           "BPF_F_TEST_XDP_LIVE_FRAMES"]
