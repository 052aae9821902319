/* The destination tables the benchmarks read, one address per packet or
 * lookup, written by bench/common.py (write_destinations) through mmap. */
#ifndef BPFROUTER_BENCHDST_H
#define BPFROUTER_BENCHDST_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define BENCH_MAX (1 << 21)

/* An IPv4 destination and the header checksum that goes with it (for the
 * per-packet harness). 8 bytes, spelled out: an array map's elements are
 * 8-byte aligned, and the writer must use the kernel's stride. */
struct dst4 {
	__be32 addr;
	__u16 check;
	__u16 pad;
};

struct dst6 {
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BENCH_MAX);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct dst4);
} bench_dst4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BENCH_MAX);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct dst6);
} bench_dst6 SEC(".maps");

#endif
