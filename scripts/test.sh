#!/usr/bin/env bash
# Runs every test corelay has: Rust unit and integration tests (they start the real
# binary), then the end-to-end suite with the official socket.io-client from npm.
# Checks formatting (rustfmt) and lints (clippy, warnings denied) before any test; adds
# those components with rustup when they are missing. Installs what the tests need when it
# is missing (Node.js, npm and Chromium for the browser test from Debian, the npm packages
# from package-lock.json). Needs a Rust toolchain (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
[ -x /usr/bin/chromium ] || missing+=(chromium)
# The Redis cluster layer's tests start real servers (TLS ones with openssl-made certificates).
[ -x /usr/bin/redis-server ] || missing+=(redis-server)
# The Redis Cluster tests form clusters with redis-cli.
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# The fault tests (tests/faults.rs) put hosts and Redis in network namespaces (as root).
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
if [ ! -d node_modules/socket.io-client ] || [ ! -d node_modules/playwright-core ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi

# Formatting and lints first: either one failing fails the run (set -e).
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test (the server, then the load generator's smoke run against it)"
export CORELAY_BIN="$PWD/target/debug/corelay"
cargo test --workspace --locked --no-fail-fast 2>&1
if [ -z "${CORELAY_TEST_SCYLLA:-}" ]; then
  echo "== ScyllaDB store suite: skipped (no node here; set CORELAY_TEST_SCYLLA=host:port to run it)"
fi

echo "== socket.io-client end-to-end tests"
npm run --silent test:e2e
