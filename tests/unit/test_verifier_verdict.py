"""The one line a user sees when the kernel rejects the data plane."""
from bpfrouter.bpf import BpfError, load_failure, verifier_verdict

# the end of a real rejection, as libbpf prints it (6.18)
LOG = """libbpf: prog 'bpfrouter_xdp': BPF program load failed: -EACCES
libbpf: prog 'bpfrouter_xdp': -- BEGIN PROG LOAD LOG --
2679: (2d) if r1 > r2 goto pc+7
combined stack size of 3 calls is 560. Too large
processed 352711 insns (limit 1000000) max_states_per_insn 18 total_states 17406 peak_states 1702 mark_read 0
-- END PROG LOAD LOG --
libbpf: prog 'bpfrouter_xdp': failed to load: -13
libbpf: failed to load object '/work/main/build/router.bpf.o'
"""

# the end of a real rejection of a program over the verifier's budget (6.18)
TOO_LARGE = """libbpf: prog 'xdp_too_long': BPF program load failed: Argument list too long
libbpf: prog 'xdp_too_long': -- BEGIN PROG LOAD LOG --
; acc = acc * 31 + i; @ big.bpf.c:17
8: (27) r2 *= 31                      ; R2=scalar()
9: (0f) r2 += r5                      ; R2=scalar() R5=0x1b206
; for (i = 0; i < 2000000; i++) @ big.bpf.c:16
10: (07) r5 += 1
BPF program is too large. Processed 1000001 insn
processed 1000001 insns (limit 1000000) max_states_per_insn 4 total_states 9663 peak_states 9663 mark_read 0
-- END PROG LOAD LOG --
libbpf: prog 'xdp_too_long': failed to load: -7
libbpf: failed to load object '/tmp/bad/big.bpf.o'
"""

# no program refused: a map the kernel would not create (as libbpf 1.1 says it)
MAP_FAILED = """libbpf: map 'percpu': created successfully, fd=4
libbpf: Error in bpf_create_map_xattr(hash):Invalid argument(-22). Retrying without BTF.
libbpf: map 'hash': failed to create: Invalid argument(-22)
libbpf: failed to load object 'build/selftest.bpf.o'
"""


def test_the_verdict_is_the_verifiers_reason_not_libbpfs_wrapping():
    assert verifier_verdict(LOG) == "combined stack size of 3 calls is 560. Too large"


def test_no_log_says_so():
    assert verifier_verdict("libbpf: failed to load object 'x.o'\n") == "no verifier log"


def test_a_failed_load_names_the_refused_program_and_the_verifiers_reason():
    assert load_failure(LOG) == ("bpfrouter_xdp", "combined stack size of 3 calls is 560. Too large")
    assert load_failure(TOO_LARGE) == ("xdp_too_long", "BPF program is too large. Processed 1000001 insn")


def test_a_load_that_failed_before_any_program_gives_libbpfs_complaint():
    assert load_failure(MAP_FAILED) == (None, "map 'hash': failed to create: Invalid argument(-22)")
    assert load_failure("") == (None, "no log from libbpf")


def test_the_error_is_one_line_with_the_reason_after_the_errno():
    e = BpfError("load BPF object big.bpf.o, program xdp_too_long", 7, TOO_LARGE,
                 "BPF program is too large. Processed 1000001 insn")
    assert str(e) == ("load BPF object big.bpf.o, program xdp_too_long: Argument list too long: "
                      "BPF program is too large. Processed 1000001 insn")
    assert e.errno == 7 and e.detail == TOO_LARGE
