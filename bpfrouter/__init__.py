"""bpfrouter: a Linux router whose packet path runs as eBPF (XDP).

Layers, lowest first; each imports only from those below it:
  bpf/        thin typed binding over libbpf (no domain knowledge)
  datapath/   load, attach, pin; typed map layouts checked against BTF
  fib, neighbors, interfaces, observe, routespec, packet   domain modules
  agent/      kernel sync and control API
  router, lab, cli                                           interfaces
"""
__version__ = "0.1.0"
