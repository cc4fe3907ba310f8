#!/usr/bin/env bash
# qosloop's main job on its embedded defaults: the reference experiment of
# seeds/004 §IV in network namespaces, every component real (meter,
# collector on SQLite, policy server on the sample LDIF policy, enforcer on
# HTB + nftables). Writes out/paper/{summary.json,report.md,fig9-*,fig10-*}.
# Extra arguments go to `qosloop-testbed paper` (e.g. --quick, --postgres,
# --ldap). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --locked --workspace --bins
target/release/qosloop-testbed paper --out out/paper "$@"
