"""RCU grace periods on demand, for the FIB writers' reuse of memory and ids.

The data plane runs inside an RCU read-side section (XDP in softirq, test
runs under rcu_read_lock), so once a grace period has passed since a group,
a block or a next-hop id stopped being reachable from the tables, no packet
still reads it, and it can be written again. The kernel waits for a grace
period (synchronize_rcu in maybe_wait_bpf_programs, kernel/bpf/syscall.c)
whenever user space updates an element of a map-in-map: updating the one
element of a private ARRAY_OF_MAPS is a grace period on demand, where a
sleep could only guess its length. (The kernel's selftests use the same
call, kern_sync_rcu.)

Writers tag what they free with mark() and reuse it once passed(tag), or
wait(tag) first. One counter per process: every writer's grace periods
serve the others. Callers serialize (the agent's lock)."""
from __future__ import annotations

import ctypes
import os

from .bpf import libbpf as L

BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_ARRAY_OF_MAPS = 2, 12


class GracePeriods:
    def __init__(self):
        self.completed = 0  # grace periods waited for by this process
        self._outer = self._inner = -1

    def _open(self) -> None:
        inner = L.check(L.bpf_map_create(BPF_MAP_TYPE_ARRAY, b"grace_inner", 4, 4, 1, None),
                        "create the grace-period inner map")
        opts = L.MapCreateOpts(sz=ctypes.sizeof(L.MapCreateOpts), inner_map_fd=inner)
        try:
            outer = L.check(L.bpf_map_create(BPF_MAP_TYPE_ARRAY_OF_MAPS, b"grace", 4, 4, 1, ctypes.byref(opts)),
                            "create the grace-period map-in-map")
        except Exception:
            os.close(inner)
            raise
        self._inner, self._outer = inner, outer

    def mark(self) -> int:
        """A tag for what becomes unreachable now."""
        return self.completed

    def passed(self, tag: int) -> bool:
        """Whether a whole grace period has passed since mark() returned tag."""
        return self.completed > tag

    def wait(self, tag: int | None = None) -> None:
        """Return once a grace period has passed since tag (None: since now)."""
        if tag is not None and self.passed(tag):
            return
        if self._outer < 0:
            self._open()
        key, value = ctypes.c_uint32(0), ctypes.c_uint32(self._inner)
        # returns after synchronize_rcu(): a grace period that began after this call
        L.check(L.bpf_map_update_elem(self._outer, ctypes.byref(key), ctypes.byref(value), 0),
                "update the grace-period map-in-map")
        self.completed += 1


GRACE = GracePeriods()
