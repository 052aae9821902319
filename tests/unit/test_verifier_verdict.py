"""The one line a user sees when the kernel rejects the data plane."""
from bpfrouter.bpf import verifier_verdict

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


def test_the_verdict_is_the_verifiers_reason_not_libbpfs_wrapping():
    assert verifier_verdict(LOG) == "combined stack size of 3 calls is 560. Too large"


def test_no_log_says_so():
    assert verifier_verdict("libbpf: failed to load object 'x.o'\n") == "no verifier log"
