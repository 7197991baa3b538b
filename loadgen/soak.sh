#!/usr/bin/env bash
# Soak run: corelay (release) under `churn` load for a long window, sampling each server
# process's RSS, open fds and CPU ticks every 10 s; prints the spread of RSS and fds after
# the warm-up and leaves every file in OUT_DIR.
#
#   loadgen/soak.sh OUT_DIR
#
# HOSTS=1 (the default): one process on the embedded store with fsync, the default setup.
# HOSTS=N > 1: a cluster on this machine, a redis-server on a free port and N processes
# (`--redis … --store redis`), the load spread over them; each host's figures are
# printed on their own. REDIS_UNIX=1: the hosts reach Redis over its Unix socket.
#
# Knobs (environment): DURATION=1800s (seconds, with the s) RATE=2500 (msg/s; rooms of 10 => 9 deliveries each)
# CONNS=1000 CHURN_RATE=50 CHURN_HOLD=1s WARMUP_S=900 (seconds of the run left out of the
# flatness figure) SHARDS=2 (per process) HOSTS=1, CARGO_TARGET_DIR (where release
# binaries are; SKIP_BUILD=1 to use them as they are). Bounded: the load generator stops
# after DURATION plus a grace.
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
HOSTS=${HOSTS:-1}
target_dir=${CARGO_TARGET_DIR:-$root/target}
if [ -z "${SKIP_BUILD:-}" ]; then
  (cd "$root" && cargo build --release -p corelay -p corelay-loadgen)
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
ulimit -n 20000 2>/dev/null || true
secret=soak-secret-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

# What each host is started with: the embedded store alone, or cluster mode through Redis.
store_args=(--data-dir "$out/data")
redis_pid=
if [ "$HOSTS" -gt 1 ]; then
  command -v redis-server >/dev/null || { echo "HOSTS=$HOSTS needs redis-server" >&2; exit 1; }
  redis_port=$(free_port)
  redis_url="redis://127.0.0.1:$redis_port"
  unix_args=()
  if [ -n "${REDIS_UNIX:-}" ]; then
    unix_args=(--unixsocket "$out/redis.sock" --unixsocketperm 700)
    redis_url="unix://$out/redis.sock"
  fi
  redis-server --bind 127.0.0.1 --port "$redis_port" "${unix_args[@]}" --save '' --appendonly no \
    --dir "$out" >"$out/redis.log" 2>&1 &
  redis_pid=$!
  pids+=("$redis_pid")
  for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  store_args=(--redis "$redis_url" --store redis)
fi
rm -rf "$out/data"
targets=()
for h in $(seq "$HOSTS"); do
  port=$(free_port)
  CORELAY_JWT_SECRET=$secret CORELAY_LIMITS_SEND_RATE=1000000 CORELAY_LIMITS_SEND_BURST=1000000 RUST_LOG=warn \
    "$target_dir/release/corelay" serve --listen "127.0.0.1:$port" --shards "$SHARDS" \
    "${store_args[@]}" >"$out/server-$h.log" 2>&1 &
  pids+=($!)
  targets+=("127.0.0.1:$port")
  for _ in $(seq 100); do grep -q "listening on" "$out/server-$h.log" && break; sleep 0.1; done
done
hosts=("${pids[@]}")
[ -n "$redis_pid" ] && hosts=("${pids[@]:1}")
start=$(date +%s)
# One line per host and sample: seconds since start, host number, RSS KiB, open fds, CPU ticks.
( while kill -0 "${hosts[0]}" 2>/dev/null; do
    t=$(( $(date +%s) - start ))
    for i in "${!hosts[@]}"; do
      p=${hosts[$i]}
      echo "$t $((i + 1)) $(awk '/VmRSS/{print $2}' /proc/$p/status) $(ls /proc/$p/fd | wc -l) $(awk '{print $14+$15}' /proc/$p/stat)"
    done
    sleep 10
  done ) >"$out/samples.txt" 2>/dev/null &
server_pids=()
for p in "${pids[@]}"; do server_pids+=(--server-pid "$p"); done
"$target_dir/release/corelay-loadgen" churn -t "$(IFS=,; echo "${targets[*]}")" --secret "$secret" \
  -c "$CONNS" -m 10 -r "$RATE" --churn-rate "$CHURN_RATE" --churn-hold "$CHURN_HOLD" --warmup 10s \
  -d "$DURATION" --grace 5s "${server_pids[@]}" --no-progress --hdr-out "$out/soak.hdr" \
  >"$out/loadgen.txt" 2>&1
kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
# The load ran from about 10 s (after the 10 s warm-up of the loadgen) to 10 s + DURATION;
# later samples see the connections closing.
end=$(( 10 + ${DURATION%s} ))
sed '$d' "$out/loadgen.txt"
# Flatness after the warm-up, while the load ran (samples in seconds since start), per host.
for h in $(seq "$HOSTS"); do
  awk -v from="$WARMUP_S" -v to="$end" -v host="$h" '$2 == host && $1 >= from && $1 <= to {
      if (rmin == "" || $3 < rmin) rmin = $3; if ($3 > rmax) rmax = $3;
      if (fmin == "" || $4 < fmin) fmin = $4; if ($4 > fmax) fmax = $4; n++ }
    END { printf "host %d after %ss: %d samples; RSS %d..%d KiB (spread %.1f%%); open fds %d..%d (spread %.1f%%)\n",
          host, from, n, rmin, rmax, (rmax - rmin) * 100 / rmin, fmin, fmax, (fmax - fmin) * 100 / fmin }' "$out/samples.txt"
done
