#!/usr/bin/env bash
# The one test command: installs what the tests need (tests/deps.sh), checks formatting
# (cargo fmt --check), checks and unit-tests the Prometheus alert rules in examples/prometheus
# (promtool check rules, promtool test rules), runs every Rust test (cargo test --all-targets: unit, property,
# hermetic integration), runs every fuzz target briefly (fuzz/run.sh, 20 s each), and runs the
# end-to-end scenarios with real clients and a real registry (tests/e2e/). Prints a summary
# line per suite and exits non-zero if anything failed. `.ci/run` calls exactly this.
#
#   bash tests/run.sh            everything
#   SKIP_E2E=1 bash tests/run.sh Rust tests (and the short fuzz run) only
#   SKIP_FUZZ=1 bash tests/run.sh without the short fuzz run
set -uo pipefail
cd "$(dirname "$0")/.."

bash tests/deps.sh || exit 1
export CARGO_TERM_COLOR=never

status=0
start=$(date +%s)
# Formatting first: cheap, and the code is only reviewed in rustfmt's form.
if cargo fmt --version >/dev/null 2>&1; then
  if cargo fmt --all --check >/dev/null; then
    fmt_summary="cargo fmt --check: ok"
  else
    cargo fmt --all --check 2>&1 | head -n 40
    fmt_summary="cargo fmt --check: FAILED (run cargo fmt --all)"
    status=1
  fi
else
  fmt_summary="cargo fmt --check: skipped (rustfmt is not installed)"
fi

# The alert rules: valid, and each alert fires and stays quiet on the series its tests give.
if command -v promtool >/dev/null; then
  if (cd examples/prometheus && promtool check rules stowage-alerts.yml >/dev/null &&
      promtool test rules stowage-alerts.test.yml >/dev/null); then
    promtool_summary="promtool check/test rules: ok"
  else
    (cd examples/prometheus && promtool check rules stowage-alerts.yml; promtool test rules stowage-alerts.test.yml) 2>&1 | head -n 60
    promtool_summary="promtool check/test rules: FAILED"
    status=1
  fi
else
  promtool_summary="promtool check/test rules: FAILED (promtool missing; tests/deps.sh installs Debian's prometheus)"
  status=1
fi

log=$(mktemp /tmp/stowage-cargo-test.XXXXXX)
cargo test --all-targets --locked 2>&1 | tee "$log"
cargo_status=${PIPESTATUS[0]}
# cargo prints one "test result:" line per test binary; add them up.
summary=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } n++ }
  END { printf "cargo test: %d passed, %d failed, %d ignored in %d test binaries", p, f, g, n }' "$log")
rm -f "$log"
[[ $cargo_status -eq 0 ]] || status=1

# A short, bounded run of each fuzz target (fuzz/README.md); a crash fails the suite.
fuzz_summary="fuzz: skipped (SKIP_FUZZ)"
if [[ -z ${SKIP_FUZZ:-} ]]; then
  fuzz_log=$(mktemp /tmp/stowage-fuzz-run.XXXXXX)
  bash fuzz/run.sh "${FUZZ_SECONDS:-20}" 2>&1 | tee "$fuzz_log"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
  fuzz_summary=$(grep -E '^fuzz: ([0-9]+ targets|build FAILED|cargo install)' "$fuzz_log" | tail -n 1)
  [[ -n $fuzz_summary ]] || fuzz_summary="fuzz: FAILED (no summary)"
  rm -f "$fuzz_log"
fi

e2e_summary="e2e: skipped (SKIP_E2E)"
if [[ -z ${SKIP_E2E:-} ]]; then
  e2e_log=$(mktemp /tmp/stowage-e2e.XXXXXX)
  bash tests/e2e/run.sh 2>&1 | tee "$e2e_log"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
  e2e_summary=$(grep '^e2e: ' "$e2e_log" | tail -n 1)
  rm -f "$e2e_log"
fi

echo
echo "== summary ($(($(date +%s) - start))s) =="
echo "$fmt_summary"
echo "$promtool_summary"
echo "$summary"
echo "$fuzz_summary"
echo "$e2e_summary"
[[ $status -eq 0 ]] && echo "RESULT: ok" || echo "RESULT: FAILED"
exit $status
