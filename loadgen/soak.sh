#!/usr/bin/env bash
# Soak run: corelay (release, embedded store with fsync, the default) under `churn` load for
# a long window, sampling the server's RSS, open fds and CPU ticks every 10 s; prints the
# spread of RSS and fds after the warm-up and leaves every file in OUT_DIR.
#
#   loadgen/soak.sh OUT_DIR
#
# Knobs (environment): DURATION=1800s (seconds, with the s) RATE=2500 (msg/s; rooms of 10 => 9 deliveries each)
# CONNS=1000 CHURN_RATE=50 CHURN_HOLD=1s WARMUP_S=900 (seconds of the run left out of the
# flatness figure) SHARDS=2, CARGO_TARGET_DIR (where release binaries are; SKIP_BUILD=1 to
# use them as they are). Bounded: the load generator stops after DURATION plus a grace.
set -euo pipefail
out=${1:?usage: loadgen/soak.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${DURATION:-1800s}
RATE=${RATE:-2500}
CONNS=${CONNS:-1000}
CHURN_RATE=${CHURN_RATE:-50}
CHURN_HOLD=${CHURN_HOLD:-1s}
WARMUP_S=${WARMUP_S:-900}
SHARDS=${SHARDS:-2}
target_dir=${CARGO_TARGET_DIR:-$root/target}
if [ -z "${SKIP_BUILD:-}" ]; then
  (cd "$root" && cargo build --release -p corelay -p corelay-loadgen)
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
ulimit -n 20000 2>/dev/null || true
secret=soak-secret-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rm -rf "$out/data"
CORELAY_JWT_SECRET=$secret CORELAY_LIMITS_SEND_RATE=1000000 CORELAY_LIMITS_SEND_BURST=1000000 RUST_LOG=warn \
  "$target_dir/release/corelay" serve --listen "127.0.0.1:$port" --shards "$SHARDS" \
  --data-dir "$out/data" >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening on" "$out/server.log" && break; sleep 0.1; done
start=$(date +%s)
( while kill -0 "$server" 2>/dev/null; do
    echo "$(( $(date +%s) - start )) $(awk '/VmRSS/{print $2}' /proc/$server/status) $(ls /proc/$server/fd | wc -l) $(awk '{print $14+$15}' /proc/$server/stat)"
    sleep 10
  done ) >"$out/samples.txt" 2>/dev/null &
"$target_dir/release/corelay-loadgen" churn -t "127.0.0.1:$port" --secret "$secret" -c "$CONNS" -m 10 \
  -r "$RATE" --churn-rate "$CHURN_RATE" --churn-hold "$CHURN_HOLD" --warmup 10s -d "$DURATION" \
  --grace 5s --server-pid "$server" --no-progress --hdr-out "$out/soak.hdr" >"$out/loadgen.txt" 2>&1
kill "$server"; wait "$server" || true
# The load ran from about 10 s (after the 10 s warm-up of the loadgen) to 10 s + DURATION;
# later samples see the connections closing.
end=$(( 10 + ${DURATION%s} ))
sed '$d' "$out/loadgen.txt"
# Flatness after the warm-up, while the load ran (samples in seconds since start).
awk -v from="$WARMUP_S" -v to="$end" '$1 >= from && $1 <= to {
    if (rmin == "" || $2 < rmin) rmin = $2; if ($2 > rmax) rmax = $2;
    if (fmin == "" || $3 < fmin) fmin = $3; if ($3 > fmax) fmax = $3; n++ }
  END { printf "after %ss: %d samples; RSS %d..%d KiB (spread %.1f%%); open fds %d..%d (spread %.1f%%)\n",
        from, n, rmin, rmax, (rmax - rmin) * 100 / rmin, fmin, fmax, (fmax - fmin) * 100 / fmin }' "$out/samples.txt"
