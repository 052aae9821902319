#!/usr/bin/env bash
# Installs what bpfrouter needs on Debian 12, idempotently and quickly when
# everything is already there: Debian packages, bpffs, the project virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

# libpcap0.8: `bpfrouter capture` compiles tcpdump filters with it; tshark reads captures in tests;
# frr: a real routing daemon drives ECMP in the tests (zebra, staticd, vtysh)
PKGS=(clang-19 llvm-19 libbpf-dev libbpf1 bpftool iproute2 iputils-ping ethtool iperf3
      util-linux python3-venv libpcap0.8 tshark frr)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bpfrouter: missing Debian packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  apt-get update -q >/dev/null
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$(id -u)" -eq 0 ] && ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
  mount -t bpf bpf /sys/fs/bpf
fi

PY=${PYTHON:-python3}
LOCK=requirements.lock

# --relock: resolve pyproject.toml's dependencies afresh in a scratch venv and
# write every version it got into the lock (then run the tests and commit it)
if [ "${1:-}" = "--relock" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m venv "$tmp"
  "$tmp/bin/pip" install -q --disable-pip-version-check -e '.[test]'
  { echo "# The Python packages the tests passed with, installed by scripts/install-deps.sh."
    echo "# Made by scripts/install-deps.sh --relock (pip freeze of a fresh venv); bounds in pyproject.toml."
    "$tmp/bin/pip" freeze --exclude-editable; } > "$LOCK"
  echo "wrote $LOCK"
  exit 0
fi

# the venv holds exactly the locked versions: --no-deps installs nothing unlocked,
# and pip check fails if pyproject.toml asks for a package or version the lock lacks
stamp=.venv/.installed
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$LOCK" -nt "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -r "$LOCK" -e .
  if ! problems=$(.venv/bin/pip check 2>&1); then
    echo "bpfrouter: $LOCK does not satisfy pyproject.toml ($(echo "$problems" | head -1)); run scripts/install-deps.sh --relock" >&2
    exit 1
  fi
  touch "$stamp"
fi
