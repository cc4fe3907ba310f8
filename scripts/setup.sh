#!/usr/bin/env bash
# Installs what qosloop and its tests need on Debian 12, when missing:
# the services the tests start (PostgreSQL, slapd), the kernel tools
# (iproute2, nftables) and the peers qosloop is measured against.
# Idempotent: a second run installs nothing. Needs root.
set -euo pipefail

packages=(
  postgresql      # initdb/postgres for the SQL tests (started by the harness)
  slapd           # the LDAP policy repository in tests
  ldap-utils      # ldapadd/ldapsearch
  nftables        # nft, the baseline for enforcement speed
  iproute2        # ip, tc
  iperf3          # traffic source in the testbed
  tshark          # reference flow statistics
  softflowd       # peer meter
  nfdump          # peer collector (nfcapd)
  pmacct          # peer meter and collector (pmacctd, nfacctd)
  librsvg2-bin    # rsvg-convert: the testbed's plots as PNG
  g++             # libFuzzer (built by libfuzzer-sys) for scripts/fuzz.sh
  openssl         # throwaway certificates of the TLS tests
  chromium        # the live page test (headless, driven over WebDriver)
  chromium-driver # chromedriver, the WebDriver server of that test
  faketime        # libfaketime: a collector node with a skewed clock (cluster test)
  stress-ng       # loads both cores for the suite's determinism runs (docs/testing.md)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: needs root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# schemathesis (PyPI) validates the console API's live responses against its
# OpenAPI document (policy-server/tests/console.rs). Pinned.
SCHEMATHESIS_VERSION=4.32.5
if ! command -v schemathesis >/dev/null 2>&1 || \
   ! schemathesis --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  if ! command -v pip3 >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || { echo "setup: needs root to install python3-pip" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  echo "setup: installing schemathesis==$SCHEMATHESIS_VERSION"
  pip3 install -q "schemathesis==$SCHEMATHESIS_VERSION" 2>/dev/null || \
    pip3 install -q --break-system-packages "schemathesis==$SCHEMATHESIS_VERSION"
fi

# Debian's postgresql package starts a cluster of its own; the tests start
# theirs on free ports and do not need it.

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found. Install Rust (1.85 or newer) with rustup: https://rustup.rs" >&2
  exit 1
fi
# cargo-nextest runs the test suite (scripts/test.sh). This machine image
# ships it; elsewhere it is built from crates.io once (a few minutes).
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
echo "setup: ready ($(cargo --version), $(cargo nextest --version | head -1))"
