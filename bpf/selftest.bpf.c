// SPDX-License-Identifier: GPL-2.0
/* Maps and a program for the libbpf binding's own tests (tests/dataplane/test_binding.py). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct pair {
	__u32 a;
	__u16 b;
	__u16 c;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct pair);
} hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);   /* 4 bytes: per-CPU values are padded to 8 */
} percpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

/* Emits the frame length into the ring buffer and bumps percpu[0]. */
SEC("xdp")
int xdp_emit_len(struct xdp_md *ctx)
{
	__u32 k = 0, *n = bpf_map_lookup_elem(&percpu, &k);
	__u32 *rec;

	if (n)
		(*n)++;
	rec = bpf_ringbuf_reserve(&events, sizeof(*rec), 0);
	if (rec) {
		*rec = ctx->data_end - ctx->data;
		bpf_ringbuf_submit(rec, 0);
	}
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
