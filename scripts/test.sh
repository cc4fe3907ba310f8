#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what the tests need, then
# format check, clippy with warnings as errors, every test of the workspace
# under cargo-nextest (each test its own process, the crates' test binaries
# side by side; groups and the slow-test report in .config/nextest.toml),
# the doctests, then the fuzz targets for a bounded time. Tests needing root
# or a Debian package fail under CI=true when it is missing, and skip
# (saying why, and counted at the end) elsewhere. docs/testing.md says how
# to run a part of it.
set -euo pipefail
cd "$(dirname "$0")/.."

timings=()
# Runs a phase and notes how long it took.
phase() {
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  "$@"
  timings+=("$(printf '%-9s %5d s' "$name" $((SECONDS - start)))")
}

# Skipped tests (outside CI) write one line each here (qosloop-testkit's
# harness::skip); printed at the end.
export QOSLOOP_SKIP_LOG="${QOSLOOP_SKIP_LOG:-$(mktemp -t qosloop-skipped.XXXXXX)}"
: >"$QOSLOOP_SKIP_LOG"

phase setup scripts/setup.sh
phase fetch cargo fetch --locked
phase fmt cargo fmt --all -- --check
phase clippy cargo clippy --workspace --all-targets --locked -- -D warnings
phase build cargo nextest run --workspace --locked --profile ci --no-run
# The fuzz targets build (release, instrumented, target/fuzz) while the
# tests run: the tests wait on sockets, processes and the kernel most of the
# time, and must pass with the other core busy anyway.
mkdir -p target
scripts/fuzz.sh --build >target/fuzz-build.log 2>&1 &
fuzz_build=$!
trap 'kill "$fuzz_build" 2>/dev/null || true' EXIT
phase tests cargo nextest run --workspace --locked --profile ci
phase doctests cargo test --workspace --doc --locked --quiet
wait_fuzz_build() {
  wait "$fuzz_build" || { cat target/fuzz-build.log; return 1; }
}
phase fuzz-build wait_fuzz_build
# The decoders of everything that comes from outside (export and COPS
# messages, LDIF, packets, capture files, rule files) under libFuzzer, a
# bounded time each.
phase fuzz scripts/fuzz.sh 15

echo "== time per phase"
printf '%s\n' "${timings[@]}"
echo "== the 15 slowest tests (all in target/nextest/ci/junit.xml)"
grep -o '<testcase name="[^"]*" classname="[^"]*" timestamp="[^"]*" time="[^"]*"' target/nextest/ci/junit.xml |
  sed -E 's/<testcase name="([^"]*)" classname="([^"]*)" timestamp="[^"]*" time="([^"]*)"/\3 \2 \1/' |
  sort -rn | awk 'NR <= 15 {printf "%8.1f s  %s %s\n", $1, $2, $3}'
skipped=$(wc -l <"$QOSLOOP_SKIP_LOG")
if [ "$skipped" -gt 0 ]; then
  echo "== $skipped test(s) skipped for a missing prerequisite:"
  cut -f1,3 "$QOSLOOP_SKIP_LOG" | sort | uniq
else
  echo "== no test skipped"
fi
# The plain closing line: tests run under nextest (all passed, or the
# script stopped at that phase).
sed -nE 's/^<testsuites name="nextest-run" tests="([0-9]+)" skipped="[0-9]+" failures="([0-9]+)".*/tests: \1 passed, \2 failed/p' \
  target/nextest/ci/junit.xml
