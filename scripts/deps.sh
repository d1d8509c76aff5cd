#!/usr/bin/env bash
# Installs the Debian packages blockd's tests, quickstart and benchmarks use.
# Idempotent and non-interactive; run as root on Debian 12. Skips apt entirely when every
# needed command is already present (pass --force to install anyway).
set -euo pipefail

# command:package pairs
NEEDED=(
  nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdfuse:libnbd-bin nbdsh:libnbd-bin
  nbd-client:nbd-client nbdkit:nbdkit nbd-server:nbd-server fio:fio
  qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils
  mkfs.ext4:e2fsprogs e2fsck:e2fsprogs fusermount3:fuse3 losetup:mount
  python3:python3 curl:curl c++:g++ mkfs.xfs:xfsprogs runuser:util-linux
  psql:postgresql-client-15 pgbench:postgresql-client-15
  promtool:prometheus
)
# Python module needed by the negative tests (Debian's python3, not a pyenv one).
PY_MODULES=(nbd:python3-libnbd)

missing=()
# The PostgreSQL server the database images and clones run on.
[ -x /usr/lib/postgresql/15/bin/postgres ] || missing+=(postgresql-15)
for pair in "${NEEDED[@]}"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
for pair in "${PY_MODULES[@]}"; do
  /usr/bin/python3 -c "import ${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
if [ "${1:-}" = "--force" ] || [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "error: missing packages (${missing[*]}) and not root; run as root or install them" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2046
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]:-}" libnbd-bin python3-libnbd | sort -u) >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install Rust (https://rustup.rs) and retry" >&2
  exit 1
fi
