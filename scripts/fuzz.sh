#!/usr/bin/env bash
# Runs the cargo-fuzz targets of the wire and file decoders with libFuzzer,
# each for a bounded time, on the stable toolchain: the coverage
# instrumentation libFuzzer needs is made of stable -C flags (what cargo-fuzz
# passes, minus the address sanitizer, which needs nightly). A crash fails the
# script and leaves the input under target/fuzz/artifacts/TARGET/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     (default 20 s, every target)
#   scripts/fuzz.sh --build [TARGET...]       (build them only: scripts/test.sh
#                                              builds while the tests run)
#
# Two targets run at a time (the machine has two cores); each one's lines
# are printed when it ends.
#
# Targets: crane cops (schema/fuzz), ldif (policy-server/fuzz), decode
# capture_file field_rules pattern_rules flow_keys_xml (meter/fuzz), ipfix
# netflow_v9 netflow_v5 (collector/fuzz: the flow-protocol decoders), and the
# stateful ones that negotiate a session from the fuzzer's bytes and then
# send data: crane_session and ipfix_session (collector/fuzz: templates, then
# data for them) and cops_session (policy-server/fuzz), run when their crate
# and target are in the tree.
#
# Memory blow-ups count as crashes. libFuzzer is given -rss_limit_mb=2048
# (its watchdog thread reads the RSS every second) and -malloc_limit_mb=256,
# but without a sanitizer libFuzzer cannot hook malloc, so the malloc limit
# alone would do nothing: every fuzz target therefore installs a capping
# #[global_allocator] (one file, schema/fuzz/fuzz_targets/cap_alloc.rs,
# included by the other fuzz crates) that aborts — a crash with the input
# saved — when one allocation passes 256 MiB or the live total 2 GiB.
#
# Committed seeds in CRATE/seeds/TARGET/ are read besides the corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

build_only=false
if [ "${1:-}" = "--build" ]; then
  build_only=true
  shift
  secs=0
else
  secs="${1:-20}"
  shift || true
fi
declare -A crate=(
  [crane]=schema/fuzz [cops]=schema/fuzz [ldif]=policy-server/fuzz
  [decode]=meter/fuzz [capture_file]=meter/fuzz [field_rules]=meter/fuzz
  [pattern_rules]=meter/fuzz [flow_keys_xml]=meter/fuzz
  [crane_session]=collector/fuzz [cops_session]=policy-server/fuzz
  [ipfix]=collector/fuzz [netflow_v9]=collector/fuzz [netflow_v5]=collector/fuzz
  [ipfix_session]=collector/fuzz
)
all=(crane cops ldif decode capture_file field_rules pattern_rules flow_keys_xml crane_session cops_session
  ipfix netflow_v9 netflow_v5 ipfix_session)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for t in "${all[@]}"; do
    # The stateful targets are written in their own crates: skip one that
    # is not in this tree yet, saying so.
    if [ -f "${crate[$t]}/fuzz_targets/$t.rs" ]; then
      targets+=("$t")
    else
      echo "fuzz: $t skipped (${crate[$t]}/fuzz_targets/$t.rs not in the tree)" >&2
    fi
  done
fi

host="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="$PWD/target/fuzz"
# With --target, these flags reach the fuzzed code only (not build scripts).
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"

# One build per fuzz crate, for all of its targets at once (one target
# directory for all: what they share is built once).
declare -A bins=()
for t in "${targets[@]}"; do
  dir="${crate[$t]:-}"
  if [ -z "$dir" ]; then
    echo "fuzz: unknown target $t" >&2
    exit 64
  fi
  bins[$dir]+=" --bin $t"
done
for dir in "${!bins[@]}"; do
  # shellcheck disable=SC2086 # the --bin flags split on purpose
  cargo build --quiet --release --locked --target "$host" --manifest-path "$dir/Cargo.toml" ${bins[$dir]}
done

$build_only && exit 0

# Runs target $1 for $secs s; its lines go to $2. libFuzzer's own status is
# the function's. (Read from PIPESTATUS with errexit off: a `|| true` after
# the pipe would run on libFuzzer's failure under pipefail and reset
# PIPESTATUS to 0, hiding every crash.)
run_one() {
  local t=$1 out=$2 dir="${crate[$1]}"
  local corpus="target/fuzz/corpus/$t" artifacts="target/fuzz/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts"
  # Committed seeds (a valid session, say) are read besides the corpus;
  # what libFuzzer finds goes to the corpus only.
  local seeds=()
  [ -d "$dir/seeds/$t" ] && seeds=("$dir/seeds/$t")
  set +e
  "$CARGO_TARGET_DIR/$host/release/$t" -max_total_time="$secs" -rss_limit_mb=2048 \
    -malloc_limit_mb=256 -max_len=65536 -artifact_prefix="$artifacts" -print_final_stats=1 \
    "$corpus" "${seeds[@]}" 2>&1 |
    grep -E "^(stat::number_of_executed_units|stat::peak_rss|==|SUMMARY|INFO: seed|#[0-9]+ +DONE)" >"$out"
  local status=("${PIPESTATUS[@]}")
  set -e
  return "${status[0]}"
}

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
failed=0
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  pair=("${targets[@]:i:2}")
  pids=()
  for t in "${pair[@]}"; do
    echo "fuzz: $t for ${secs} s"
    run_one "$t" "$logs/$t" &
    pids+=($!)
  done
  for k in "${!pair[@]}"; do
    t=${pair[$k]}
    status=0
    wait "${pids[$k]}" || status=$?
    sed "s/^/  $t: /" "$logs/$t"
    if [ "$status" -ne 0 ]; then
      echo "fuzz: $t found a crash (exit $status), input in target/fuzz/artifacts/$t/" >&2
      failed=1
    fi
  done
done
exit "$failed"
