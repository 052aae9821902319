// SPDX-License-Identifier: GPL-2.0
/* The router as one program: the same source as router.bpf.c with every
 * stage inlined, which `make bench` runs beside the chain of stages. */
#define BPFROUTER_SINGLE_PROGRAM
#include "router.bpf.c"
