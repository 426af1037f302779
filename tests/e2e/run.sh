#!/usr/bin/env bash
# Runs every end-to-end scenario (tests/e2e/NN-*.sh) against the debug binary (or $STOWAGE_BIN), each in
# its own process, and prints one summary line. Usage: tests/e2e/run.sh [PATTERN]
set -uo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
pattern=${1:-}
if [[ -z ${STOWAGE_BIN:-} ]]; then
  # The debug binary: `cargo test` has built it already, so this is usually a no-op.
  cargo build --quiet --locked --bin stowage || { echo "e2e: 0 passed, 1 failed (build)"; exit 1; }
  export STOWAGE_BIN="${CARGO_TARGET_DIR:-$dir/../../target}/debug/stowage"
fi
passed=0 failed=0 failures=()
for script in "$dir"/[0-9][0-9]-*.sh; do
  name=$(basename "$script" .sh)
  [[ -z $pattern || $name == *$pattern* ]] || continue
  start=$(date +%s)
  if timeout 600 bash "$script"; then
    passed=$((passed + 1))
    echo "e2e $name ... ok ($(($(date +%s) - start))s)"
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "e2e $name ... FAILED ($(($(date +%s) - start))s)"
  fi
done
echo "e2e: $passed passed, $failed failed${failures:+ (${failures[*]})}"
((failed == 0))
