#!/usr/bin/env bash
# The "hard days" runs: the fault tests of tests/faults.rs (latency 200±50 ms, a host cut
# from Redis for 10 s, clients cut from a host for 10 s, random connection resets, a host's
# link to Redis stalled for 10 s), each
# against corelay-2 (two hosts through Redis) and peer-2 (the seed's Node stack, two
# processes through Redis), in network namespaces made and removed by the tests.
#
# Prints one line per fault and stack: acked, lost, duplicates, reorders, missing from
# history; p99 send-to-ack before / during / after the fault (and the worst during); p99
# ack-to-delivery during / after; recovery (heal to the first ack on the faulted path)
# and time until the receivers had everything acked before the heal.
#
# Needs root, `ip netns`, redis-server, and for peer-2 Node.js with loadgen/peer's
# node_modules (`cd loadgen/peer && npm ci`). Usage: loadgen/faults.sh [RUNS] [STACKS]
# (default 1 run of "corelay-2 peer-2"). Logs go to ${OUT:-/tmp/corelay-faults}.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1}
stacks=${2:-"corelay-2 peer-2"}
out=${OUT:-/tmp/corelay-faults}
mkdir -p "$out"
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
  echo "skipped: needs root and ip netns" >&2
  exit 0
fi
cargo test --test faults --no-run -q 2>/dev/null
for stack in $stacks; do
  if [ "$stack" = peer-2 ] && [ ! -e loadgen/peer/node_modules ]; then
    echo "peer-2: loadgen/peer/node_modules missing (cd loadgen/peer && npm ci)" >&2
    continue
  fi
  for run in $(seq 1 "$runs"); do
    log="$out/$stack-$run.log"
    # One test at a time: the machine's cores are not what is measured.
    if ! FAULTS_STACK=$stack cargo test -q --test faults -- --nocapture --test-threads=1 \
      >"$log" 2>&1; then
      echo "$stack run $run: FAILED (see $log)" >&2
    fi
    grep -E '^FAULT ' "$log" | sed "s/^FAULT /run $run | /"
  done
done
