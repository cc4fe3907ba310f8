#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what the tests need, then
# format check, clippy with warnings as errors, every test of the workspace,
# then the fuzz targets for a bounded time. Tests needing root or a Debian
# package fail under CI=true when it is missing, and skip (saying why)
# elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo fetch --locked
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The decoders of everything that comes from outside (export and COPS
# messages, LDIF, packets, capture files, rule files) under libFuzzer, a
# bounded time each.
scripts/fuzz.sh 15
