#!/usr/bin/env bash
# qosloop's main job on its embedded defaults. Until the whole loop runs in
# the testbed, that is the storage self-check: migrate SQLite and a
# PostgreSQL started for the purpose, store a flow record, read it back.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo run --release --locked -p qosloop-testbed -- selfcheck --postgres "$@"
