#!/usr/bin/env bash
# `make test`: the end-to-end tests, which wait on namespaces, daemons and
# timers more than they compute, in one pytest process; the unit and
# data-plane tests in a second one beside it (its output follows the first's).
# Each process runs its tests one after another. Arguments go to both; a
# process whose tests the arguments deselect entirely (pytest's exit 5) is
# not a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
log=$(mktemp /tmp/bpfrouter-tests.XXXXXX)
trap 'rm -f "$log"' EXIT
"$PY" -m pytest "$@" tests/unit tests/dataplane >"$log" 2>&1 &
other=$!
"$PY" -m pytest "$@" tests/e2e
e2e=$?
wait "$other"
rest=$?
echo "--- unit and data-plane tests"
cat "$log"
ok() { [ "$1" -eq 0 ] || [ "$1" -eq 5 ]; }
if ok "$e2e" && ok "$rest" && ! { [ "$e2e" -eq 5 ] && [ "$rest" -eq 5 ]; }; then
  exit 0
fi
[ "$e2e" -ne 0 ] && [ "$e2e" -ne 5 ] && exit "$e2e"
exit "$rest"
