#!/usr/bin/env bash
# A short, bounded run of every fuzz target (tests/run.sh calls it after cargo test):
#
#   bash fuzz/run.sh [SECONDS]    each target for SECONDS (default 20)
#
# Installs cargo-fuzz when it is missing (nothing else), builds the targets ($FUZZ_FLAGS,
# below; RUSTC_BOOTSTRAP=1 lets the stable toolchain take the fuzzing flags), then runs each one from its committed corpus (fuzz/corpus/TARGET) and
# known crash inputs (fuzz/regressions/TARGET) into a scratch corpus. Prints one line:
#   fuzz: N targets, S s each, E executions, C crashes
# and exits non-zero on any crash or build failure; crash inputs are kept in
# fuzz/artifacts/TARGET/.
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-20}
export RUSTC_BOOTSTRAP=1 CARGO_TERM_COLOR=never
# The smoke run's build: unoptimised, no sanitizer (libFuzzer's coverage instrumentation
# stays). It builds in ~2.5 min cold on 2 cores instead of ~18 (release + AddressSanitizer
# over tokio, rustls and aws-lc), which keeps .ci/run under its 30 minutes. Long runs use
# the default build: FUZZ_FLAGS="-a" bash fuzz/run.sh 1800 (see README.md).
read -ra flags <<<"${FUZZ_FLAGS:---dev --sanitizer none}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked -q || { echo "fuzz: cargo install cargo-fuzz FAILED"; exit 1; }
fi

work=$(mktemp -d /tmp/stowage-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
if ! cargo fuzz build "${flags[@]}" >"$work/build.log" 2>&1; then
  tail -n 40 "$work/build.log"
  echo "fuzz: build FAILED"
  exit 1
fi

targets=$(cargo fuzz list)
n=0 execs=0 crashes=0
for t in $targets; do
  n=$((n + 1))
  mkdir -p "$work/$t"
  dirs=("$work/$t" "corpus/$t")
  [[ -d regressions/$t ]] && dirs+=("regressions/$t")
  # -detect_leaks=0: the request targets keep one server (and its caches) for the
  # whole run on purpose; libFuzzer's leak check would report those as leaks.
  cargo fuzz run "${flags[@]}" "$t" "${dirs[@]}" -- -max_total_time="$secs" -print_final_stats=1 \
    -detect_leaks=0 -timeout=30 -rss_limit_mb=3072 -artifact_prefix="$work/$t/crash-" \
    >"$work/$t.log" 2>&1
  rc=$?
  e=$(awk '/^stat::number_of_executed_units:/ { print $2 }' "$work/$t.log" | tail -n 1)
  execs=$((execs + ${e:-0}))
  if ((rc != 0)); then
    crashes=$((crashes + 1))
    mkdir -p "artifacts/$t"
    cp "$work/$t"/crash-* "artifacts/$t/" 2>/dev/null
    grep -E -B2 -A12 'panicked|ERROR: (libFuzzer|AddressSanitizer)' "$work/$t.log" | head -n 40
    echo "fuzz: $t FAILED (rc $rc); inputs in fuzz/artifacts/$t/"
  else
    echo "fuzz: $t ok, ${e:-0} executions"
  fi
done
echo "fuzz: $n targets, $secs s each, $execs executions, $crashes crashes"
((crashes == 0))
