#!/usr/bin/env bash
# Fuzz smoke run: every cargo-fuzz target in fuzz/ for SECONDS each (default 20).
#
#   scripts/fuzz.sh [SECONDS]
#
# Targets (`cargo fuzz list`): the nbd-proto decoders (handshake_options, requests, replies)
# and the store's on-disk format and recovery (store_records, catalog, catalog_log, segment_replay,
# store_open), the latter built on the blockd library. The first build compiles blockd's
# whole dependency tree with sanitizer instrumentation: a few minutes on a 2-core machine;
# later builds only recompile what changed.
#
# Non-interactive on a fresh Debian 12 machine with rustup stable: installs cargo-fuzz if it
# is missing (and g++, which libFuzzer's build needs, when running as root). cargo-fuzz uses
# nightly-only compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
#
# Inputs: fuzz/seeds/<target> (committed, read only) and fuzz/corpus/<target> (grows across
# runs, gitignored). A crash lands in fuzz/artifacts/<target>/ (gitignored); the script then
# prints the libFuzzer output and fails. Reproduce one with
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> artifacts/<target>/<file>
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
seconds="${1:-20}"
case "$seconds" in
  '' | *[!0-9]*)
    echo "usage: $0 [SECONDS]" >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1

if ! command -v c++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "fuzz.sh: installing g++ (libFuzzer is C++)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends g++ >/dev/null
  else
    echo "fuzz.sh: error: no C++ compiler; install g++ (libFuzzer is built from C++ source)" >&2
    exit 1
  fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
  cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

# Build everything first so that a compile error fails before any fuzzing time is spent.
build_start=$(date +%s)
cargo fuzz build
echo "fuzz.sh: built all targets in $(( $(date +%s) - build_start ))s" >&2

log_dir="$(mktemp -d)"
trap 'rm -rf "$log_dir"' EXIT
failed=()
for target in $(cargo fuzz list); do
  mkdir -p "corpus/$target"
  inputs=("corpus/$target")
  if [ -d "seeds/$target" ]; then
    inputs+=("seeds/$target")
  fi
  log="$log_dir/$target.log"
  # -timeout: an input that runs for seconds is a hang, reported like a crash.
  if cargo fuzz run "$target" "${inputs[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "fuzz.sh: $target: ${seconds}s, ${runs:-?} runs, no findings" >&2
  else
    echo "fuzz.sh: $target FAILED; last lines of its output:" >&2
    tail -n 60 "$log" >&2
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: failing targets: ${failed[*]} (crash inputs in fuzz/artifacts/)" >&2
  exit 1
fi
