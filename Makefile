# bpfrouter: `make demo` and `make test` are the two set-up commands (README).
CLANG ?= clang-19
BPF_CFLAGS := -target bpf -O2 -g -Wall -Werror -I/usr/include/$(shell uname -m)-linux-gnu
BPF_SRCS := $(wildcard bpf/*.bpf.c)
BPF_HDRS := $(wildcard bpf/include/*.h bpf/stages/*.h)
BPF_OBJS := $(patsubst bpf/%.bpf.c,build/%.bpf.o,$(BPF_SRCS))
PY := .venv/bin/python

.PHONY: all deps build test test-dataplane test-e2e test-unit demo bench bench-fib bench-differential clean

all: build

deps:
	@scripts/install-deps.sh

build: $(BPF_OBJS)

build/%.bpf.o: bpf/%.bpf.c $(BPF_HDRS) bpf/router.bpf.c
	@mkdir -p build
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

test: deps
	@$(MAKE) --no-print-directory build
	@PY=$(PY) scripts/run-tests.sh $(PYTEST_ARGS)

test-unit test-dataplane test-e2e: deps
	@$(MAKE) --no-print-directory build
	$(PY) -m pytest tests/$(patsubst test-%,%,$@) $(PYTEST_ARGS)

demo: deps
	@$(MAKE) --no-print-directory build
	$(PY) -m bpfrouter.demo $(if $(KEEP),--keep)

# quiet recipes: with ARGS=--json, stdout is one JSON object
bench: deps
	@$(MAKE) -s --no-print-directory build
	@$(PY) bench/run.py $(ARGS)

clean:
	rm -rf build

bench-fib: deps
	@$(MAKE) -s --no-print-directory build
	@$(PY) bench/fib.py $(ARGS)

# the frame differential at ten times the test's size (docs/benchmarks.md)
bench-differential: deps
	@$(MAKE) -s --no-print-directory build
	@$(PY) bench/differential.py $(ARGS)
