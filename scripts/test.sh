#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh machine, then runs every check
# and every test. Used by CI (.ci/run). Needs root (loop devices, mounts, FUSE).
#
#   scripts/test.sh            everything
#   FUZZ_SECONDS=0 scripts/test.sh   skip the fuzz smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

scripts/deps.sh

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== tests"
cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-4}"

echo "== end-to-end tests again on the io_uring engine"
BLOCKD_IO_ENGINE=uring cargo test -p blockd --no-fail-fast --test server --test crash \
  --test store_cli --test cli -- --test-threads="${TEST_THREADS:-4}"

if [ "${FUZZ_SECONDS:-15}" != 0 ]; then
  echo "== fuzz smoke (${FUZZ_SECONDS:-15}s per target)"
  scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
fi

echo "== all tests passed in $(( $(date +%s) - start )) s"
