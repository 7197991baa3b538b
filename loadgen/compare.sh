#!/usr/bin/env bash
# Compares corelay with the seed's stack (loadgen/peer: Node socket.io + Redis adapter) on
# this machine, everything on loopback, and writes a markdown table to the file given.
#
#   loadgen/compare.sh OUT.md
#
# It builds corelay and corelay-loadgen (release), installs the peer's npm packages, starts
# redis-server on a free port (when a setup needs it) and a Redis Cluster (when a
# corelay-Nc setup is asked for), then for each server setup
#   corelay     (release build, --shards $SHARDS --store $STORE, send limit raised; with
#               PIN=0, the default here, also --no-pin, as for corelay-N: the load generator
#               and Redis share these cores, and pinned shards could not move away from them;
#               two --shards 1 processes would even both pin to the first core)
#   corelay-N   (e.g. corelay-2: N corelay processes, --shards 1 each, cluster mode through
#               the one standalone Redis, --store redis: the many-hosts setup on one machine)
#   corelay-Nc  (e.g. corelay-2c: the same N processes, joined through a Redis Cluster of
#               $CLUSTER_MASTERS masters without replicas that this script starts; host i
#               is given master i mod CLUSTER_MASTERS as its --redis, and finds the others
#               itself)
#   peer-1      (one Node process)
#   peer-N      (N Node processes on N ports, joined through the standalone Redis; load
#               spread over them)
# runs `fanout` at each rate in $RATES (one sender per room), `fanout` at $ALL_SENDERS_RATE
# with every member sending (so that a room's messages enter through both Node processes:
# this is where cross-process reordering shows), and `connect` with $CONNECT_CONNS
# connections, and
# writes per-run JSON, .hdr files and one latency plot per rate beside OUT.md (in
# OUT-runs/). Server CPU and RSS are summed over the server's processes (and Redis, every
# master of the cluster, for corelay-N, corelay-Nc and peer-N). Ratios are corelay /
# peer-N, corelay-N / peer-N, corelay-Nc / peer-N and corelay-Nc / corelay-N (what the
# cluster costs against one Redis): below 1 is better for the first on latency, CPU and
# memory, above 1 on deliveries/s. SETUPS picks the setups (default "corelay corelay-2
# peer-1 peer-2"). A setup whose servers do not start (a process exits, or does not
# listen within 30 s) is skipped, and the table says why.
#
# Redis CPU: for every fanout run of a setup that uses Redis, the script samples the
# CPU time (utime + stime, /proc/PID/stat) of each of the setup's Redis processes every
# 0.1 s while the loadgen runs, and takes it over the loadgen's measured window: that
# window is not in the loadgen's JSON, so it is placed at [exit - GRACE - DURATION,
# exit - GRACE], exit being when the loadgen returned (it ends a few ms after its
# grace period; the error is that shift at an even send rate). The tables show it as
# "Redis CPU %" (of one core), "Redis CPU µs/message" (divided by the messages sent in
# the window, not by deliveries: what one message costs Redis however many receive it)
# and, for corelay-Nc, each master's share of it ("34/33/33 %"). The figures are in
# OUT-runs/RUN.redis.json, the samples in OUT-runs/RUN.redis-cpu.
#
# Knobs (environment): CONNS=1000 ROOM=10 RATES="500 2000 5000" ALL_SENDERS_RATE=1000
# (empty: skip) DURATION=10s WARMUP=2s
# GRACE=2s CONNECT_CONNS=5000 (empty or 0: skip the connect run) HOLD=5s SHARDS=2
# STORE=memory PIN=0 THREADS=1 SKIP_BUILD=1 CLUSTER_MASTERS=3 (masters of the Redis
# Cluster, at least 3)
# CARGO_TARGET_DIR (where the release binaries are built), CORELAY_BIN (another corelay
# binary to run, e.g. an older build for an A/B), REDIS_UNIX=1 (corelay-N reach Redis over
# its Unix socket instead of TCP; the peer and corelay-Nc stay on TCP).
#
# SERVER_CPUS and LOADGEN_CPUS (taskset lists, e.g. 0 and 1) keep the servers (Redis
# included) and the load generator on separate cores, so that neither takes CPU from the
# other; unset, they share every core. The loadgen reports its own share of the latency
# either way: how late it wrote the paced sends, and how long delivered frames waited in
# its sockets before it read them.
#
# CAPACITY=1 searches instead, for each setup, the highest paced rate that passes: zero
# loss, no reordering, no errors and delivery p99 <= CAP_P99_MS (50). It starts at
# CAP_START msg/s (2000), multiplies by 1.5 until a run fails or the rate passes CAP_MAX
# (60000), then halves the interval until it is within CAP_PRECISION_PCT (10) percent. A
# failed run restarts the setup, so no backlog carries over. CAP_RUNS (1) runs are made at
# each rate, and the rate passes only if every one does: at saturation a single run can
# pass or fail by luck, and CAP_RUNS=3 gives a capacity that holds. The table gives the
# loadgen's CPU at capacity: on a shared machine the loadgen may be the limit. RATES,
# ALL_SENDERS_RATE and the connect run are not used. It has the Redis CPU columns too, at
# each setup's capacity.
set -euo pipefail

out=${1:?usage: loadgen/compare.sh OUT.md}
root=$(cd "$(dirname "$0")/.." && pwd)
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
runs="${out%.md}-runs"
mkdir -p "$runs"

CONNS=${CONNS:-1000}
ROOM=${ROOM:-10}
RATES=${RATES:-"500 2000 5000"}
ALL_SENDERS_RATE=${ALL_SENDERS_RATE-1000}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
GRACE=${GRACE:-2s}
CONNECT_CONNS=${CONNECT_CONNS-5000}
HOLD=${HOLD:-5s}
SHARDS=${SHARDS:-2}
STORE=${STORE:-memory}
PIN=${PIN:-0}
pin_args=()
[ "$PIN" = 1 ] || pin_args=(--no-pin)
THREADS=${THREADS:-1}
CLUSTER_MASTERS=${CLUSTER_MASTERS:-3}
setups=${SETUPS:-"corelay corelay-2 peer-1 peer-2"}
# Which Redis the setups need: the standalone one (corelay-N, peer-N), the cluster
# (corelay-Nc).
need_redis="" need_cluster=""
for setup in $setups; do
  case "$setup" in
    corelay) ;;
    corelay-[0-9]*c) [[ "$setup" =~ ^corelay-[0-9]+c$ ]] || { echo "unknown setup $setup" >&2; exit 1; }
      need_cluster=1 ;;
    corelay-[0-9]* | peer-[0-9]*) [[ "$setup" =~ ^(corelay|peer)-[0-9]+$ ]] || { echo "unknown setup $setup" >&2; exit 1; }
      need_redis=1 ;;
    *) echo "unknown setup $setup (corelay, corelay-N, corelay-Nc, peer-N)" >&2; exit 1 ;;
  esac
done
if [ -n "$need_cluster" ] && ! [ "$CLUSTER_MASTERS" -ge 3 ] 2>/dev/null; then
  echo "CLUSTER_MASTERS=$CLUSTER_MASTERS: a Redis Cluster needs at least 3 masters" >&2
  exit 1
fi
# Command prefixes that pin the servers and the loadgen (empty: no pinning).
srv_cpus=()
[ -z "${SERVER_CPUS:-}" ] || srv_cpus=(taskset -c "$SERVER_CPUS")
lg_cpus=()
[ -z "${LOADGEN_CPUS:-}" ] || lg_cpus=(taskset -c "$LOADGEN_CPUS")
cpu_note=""
[ -z "${SERVER_CPUS:-}${LOADGEN_CPUS:-}" ] || \
  cpu_note="servers on CPUs ${SERVER_CPUS:-any}, load generator on CPUs ${LOADGEN_CPUS:-any}"
SECRET=compare-secret-0123456789abcdef
target_dir=${CARGO_TARGET_DIR:-$root/target}

log() { echo "== $*" >&2; }

# --- tools -------------------------------------------------------------------------------
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building corelay and corelay-loadgen (release)"
  (cd "$root" && cargo build --release -p corelay -p corelay-loadgen)
fi
corelay=${CORELAY_BIN:-$target_dir/release/corelay}
lg="$target_dir/release/corelay-loadgen"
[ -x "$corelay" ] && [ -x "$lg" ] || { echo "missing $corelay or $lg" >&2; exit 1; }
if [ ! -d "$root/loadgen/peer/node_modules/socket.io" ]; then
  log "installing the peer's npm packages"
  (cd "$root/loadgen/peer" && npm ci --no-audit --no-fund --loglevel=error)
fi
ulimit -n 65536 2>/dev/null || true

# --- processes ---------------------------------------------------------------------------
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

free_port() {
  node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

# cluster_ports N: N distinct free ports whose cluster bus port (port + 10000) is free too
# and none of them another's bus port. They are taken from 12000-22767, so that the bus
# ports (22000-32767) stay below the kernel's default range for outgoing ports (32768-).
cluster_ports() {
  node -e '
    const net = require("net");
    const n = Number(process.argv[1]);
    const free = (p) => new Promise((ok) => {
      const s = net.createServer();
      s.once("error", () => ok(false));
      s.listen(p, "127.0.0.1", () => s.close(() => ok(true)));
    });
    (async () => {
      const got = [], used = new Set();
      for (let k = 0; got.length < n && k < 2000; k++) {
        const p = 12000 + Math.floor(Math.random() * 10768);
        if (used.has(p) || used.has(p + 10000)) continue;
        if ((await free(p)) && (await free(p + 10000))) { got.push(p); used.add(p); used.add(p + 10000); }
      }
      if (got.length < n) { console.error("no free ports for the cluster"); process.exit(1); }
      console.log(got.join(" "));
    })();' "$1"
}

# wait_line FILE TEXT [PID]: until FILE contains TEXT (30 s at most); fails (with FILE on
# stderr) on the time limit, or as soon as process PID, the one writing FILE, has exited.
wait_line() {
  for _ in $(seq 300); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then
      echo "process $3 exited before '$2' in $1:" >&2
      cat "$1" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1:" >&2
  cat "$1" >&2
  return 1
}

stop_pid() {
  kill "$1" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
}

# The standalone Redis (corelay-N, peer-N).
redis_pid=""
if [ -n "$need_redis" ]; then
  redis_port=$(free_port)
  redis_args=()
  corelay_redis_url="redis://127.0.0.1:$redis_port"
  if [ -n "${REDIS_UNIX:-}" ]; then
    redis_args=(--unixsocket "$runs/redis.sock" --unixsocketperm 700)
    corelay_redis_url="unix://$runs/redis.sock"
  fi
  "${srv_cpus[@]}" redis-server --bind 127.0.0.1 --port "$redis_port" "${redis_args[@]}" --save '' --appendonly no \
    >"$runs/redis.log" 2>&1 &
  redis_pid=$!
  pids+=("$redis_pid")
  wait_line "$runs/redis.log" "Ready to accept connections" "$redis_pid" || exit 1
  log "redis-server on 127.0.0.1:$redis_port (pid $redis_pid)"
fi

# The Redis Cluster (corelay-Nc): CLUSTER_MASTERS masters, no replicas.
cluster_port=() cluster_pid=()
if [ -n "$need_cluster" ]; then
  read -r -a cluster_port <<<"$(cluster_ports "$CLUSTER_MASTERS")"
  for p in "${cluster_port[@]}"; do
    rm -f "$runs/nodes-$p.conf"
    "${srv_cpus[@]}" redis-server --bind 127.0.0.1 --port "$p" --cluster-enabled yes \
      --cluster-node-timeout 2000 --cluster-config-file "$runs/nodes-$p.conf" \
      --save '' --appendonly no >"$runs/redis-cluster-$p.log" 2>&1 &
    cluster_pid+=($!)
    pids+=($!)
  done
  for i in "${!cluster_port[@]}"; do
    wait_line "$runs/redis-cluster-${cluster_port[$i]}.log" "Ready to accept connections" "${cluster_pid[$i]}" || exit 1
  done
  nodes=()
  for p in "${cluster_port[@]}"; do nodes+=("127.0.0.1:$p"); done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
    >"$runs/redis-cluster-create.log" 2>&1 || {
    echo "redis-cli --cluster create failed:" >&2; cat "$runs/redis-cluster-create.log" >&2; exit 1; }
  for p in "${cluster_port[@]}"; do
    for _ in $(seq 300); do
      redis-cli -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && break
      sleep 0.1
    done
    redis-cli -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || {
      echo "the Redis Cluster is not ok after 30 s:" >&2; redis-cli -p "$p" cluster info >&2; exit 1; }
  done
  log "Redis Cluster of ${#cluster_port[@]} masters on 127.0.0.1:${cluster_port[*]} (pids ${cluster_pid[*]})"
fi

# flush_redis SETUP: empties the Redis the setup uses.
flush_redis() {
  local p
  case "$1" in
    corelay-*c) for p in "${cluster_port[@]}"; do redis-cli -p "$p" flushall >/dev/null 2>&1 || true; done ;;
    *) redis-cli -p "$redis_port" flushall >/dev/null 2>&1 || true ;;
  esac
}

# started LOG PORT: the server just started in the background ($!) belongs to the setup;
# waits until LOG says it listens (fails if it exits first), and adds 127.0.0.1:PORT to
# TARGETS.
started() {
  local pid=$!
  HOST_PIDS+=("$pid")
  SERVER_PIDS+=("$pid")
  pids+=("$pid")
  wait_line "$1" "listening on" "$pid" || return 1
  TARGETS="${TARGETS:+$TARGETS,}127.0.0.1:$2"
}

# corelay_host LOG PORT SHARDS ARGS...: starts one corelay process.
corelay_host() {
  local log_file=$1 port=$2 shards=$3; shift 3
  CORELAY_JWT_SECRET=$SECRET CORELAY_LIMITS_SEND_RATE=1000000 CORELAY_LIMITS_SEND_BURST=1000000 \
    RUST_LOG=warn "${srv_cpus[@]}" "$corelay" serve --listen "127.0.0.1:$port" --shards "$shards" "${pin_args[@]}" \
    "$@" >"$log_file" 2>&1 &
  started "$log_file" "$port"
}

# start_setup NAME: starts the servers of a setup; sets TARGETS, HOST_PIDS (its own
# processes), REDIS_PIDS (the Redis processes it uses) and SERVER_PIDS (both: what the
# loadgen samples). Fails if a server does not start; the caller then skips the setup.
start_setup() {
  TARGETS=""
  HOST_PIDS=()
  REDIS_PIDS=()
  SERVER_PIDS=()
  local n i port
  case "$1" in
    corelay)
      port=$(free_port)
      corelay_host "$runs/corelay.log" "$port" "$SHARDS" --store "$STORE" --data-dir "$runs/corelay-data" || return 1
      ;;
    corelay-*c)
      # N processes (one shard each) joined through the Redis Cluster; host i is given
      # master i mod CLUSTER_MASTERS (it learns the others from CLUSTER SLOTS). Every
      # master's CPU and memory count.
      n=${1#corelay-}; n=${n%c}
      flush_redis "$1"
      REDIS_PIDS=("${cluster_pid[@]}")
      for i in $(seq "$n"); do
        port=$(free_port)
        corelay_host "$runs/$1-$i.log" "$port" 1 \
          --redis "redis://127.0.0.1:${cluster_port[$(( (i - 1) % ${#cluster_port[@]} ))]}" --store redis || return 1
      done
      ;;
    corelay-*)
      # corelay cluster mode: N processes (one shard each) joined through Redis, as the
      # peer's N Node processes are; Redis's CPU and memory count, as for the peer.
      n=${1#corelay-}
      flush_redis "$1"
      REDIS_PIDS=("$redis_pid")
      for i in $(seq "$n"); do
        port=$(free_port)
        corelay_host "$runs/$1-$i.log" "$port" 1 --redis "$corelay_redis_url" --store redis || return 1
      done
      ;;
    peer-*)
      n=${1#peer-}
      flush_redis "$1"
      REDIS_PIDS=("$redis_pid")
      for i in $(seq "$n"); do
        port=$(free_port)
        "${srv_cpus[@]}" node "$root/loadgen/peer/server.js" --port "$port" --redis "redis://127.0.0.1:$redis_port" \
          --secret "$SECRET" >"$runs/$1-$i.log" 2>&1 &
        started "$runs/$1-$i.log" "$port" || return 1
      done
      ;;
  esac
  SERVER_PIDS+=("${REDIS_PIDS[@]}")
}

# stop_setup: stops the setup's own processes (Redis stays up, for the next setup).
stop_setup() {
  for p in "${HOST_PIDS[@]}"; do stop_pid "$p"; done
  HOST_PIDS=()
}

# setup_up NAME: start_setup; when a server does not start, stops the others, records why
# in $runs/NAME.not-started (the table shows it) and fails, so that the caller skips it.
setup_up() {
  rm -f "$runs/$1.not-started"
  start_setup "$1" 2>"$runs/$1.start.err" && { cat "$runs/$1.start.err" >&2; return 0; }
  cat "$runs/$1.start.err" >&2
  stop_setup
  grep -v '^\s*$' "$runs/$1.start.err" | tail -n 4 >"$runs/$1.not-started"
  log "$1 did not start: skipped"
  return 1
}

# cpu_ticks PID...: a line "UNIX_TIME TICKS..." with each process's CPU time (utime +
# stime, /proc/PID/stat, in clock ticks). Builtins only: no process is started.
cpu_ticks() {
  local line p f
  line=$EPOCHREALTIME
  for p in "$@"; do
    { read -r f </proc/"$p"/stat; } 2>/dev/null || return 1
    f=${f##*) }
    read -r -a f <<<"$f"
    line+=" $(( f[11] + f[12] ))"
  done
  echo "${line//,/.}"
}

# redis_window NAME END: Redis CPU over the loadgen's measured window of run NAME, from
# the samples in $runs/NAME.redis-cpu; END is when the loadgen returned. Writes
# $runs/NAME.redis.json (redis_cpu_us_per_msg, redis_cpu_pct, redis_cpu_us per process,
# redis_cpu_share_pct per process).
redis_window() {
  node - "$runs/$1.redis-cpu" "$runs/$1.json" "$2" "$(getconf CLK_TCK)" "${REDIS_PIDS[*]}" \
    >"$runs/$1.redis.json" <<'JS' || rm -f "$runs/$1.redis.json"
const fs = require('fs');
const [samplesFile, jsonFile, endArg, tckArg, pidsArg] = process.argv.slice(2);
const run = JSON.parse(fs.readFileSync(jsonFile, 'utf8'));
const rows = fs.readFileSync(samplesFile, 'utf8').trim().split('\n')
  .map((l) => l.trim().split(/\s+/).map(Number)).filter((r) => r.every(Number.isFinite));
const pids = pidsArg.split(/\s+/).map(Number);
const tck = Number(tckArg) || 100;
// The loadgen's window: it ends GRACE before the loadgen returned (plus the few ms it
// takes to finish), and lasts DURATION.
const end = Number(endArg.replace(',', '.')) - run.grace_s;
const start = end - run.duration_s;
// Ticks of process k at time t, interpolated between the samples around t.
const at = (t, k) => {
  for (let j = 1; j < rows.length; j++) {
    const [a, b] = [rows[j - 1], rows[j]];
    if (a[0] <= t && t <= b[0]) return a[k + 1] + (b[0] > a[0] ? (b[k + 1] - a[k + 1]) * (t - a[0]) / (b[0] - a[0]) : 0);
  }
  return null;
};
const us = pids.map((_, k) => {
  const [a, b] = [at(start, k), at(end, k)];
  return a === null || b === null ? null : (b - a) / tck * 1e6;
});
if (!run.sent || us.some((v) => v === null)) process.exit(1);
const total = us.reduce((x, y) => x + y, 0);
console.log(JSON.stringify({
  redis_pids: pids,
  redis_cpu_us: us.map(Math.round),
  redis_cpu_us_per_msg: total / run.sent,
  redis_cpu_pct: 100 * total / 1e6 / run.duration_s,
  redis_cpu_share_pct: us.map((v) => (total > 0 ? 100 * v / total : null)),
  redis_window_unix_s: [start, end],
}));
JS
}

run_lg() { # NAME ARGS...: runs the loadgen, keeps the JSON line in $runs/NAME.json
  local name=$1; shift
  local pid_args=() sampler="" end
  for p in "${SERVER_PIDS[@]}"; do pid_args+=(--server-pid "$p"); done
  rm -f "$runs/$name.redis-cpu" "$runs/$name.redis.json"
  if [ "$1" = fanout ] && [ ${#REDIS_PIDS[@]} -gt 0 ]; then
    # The setup's Redis CPU, sampled every 0.1 s while the loadgen runs (redis_window).
    ( while cpu_ticks "${REDIS_PIDS[@]}"; do sleep 0.1; done ) >"$runs/$name.redis-cpu" &
    sampler=$!
    pids+=("$sampler")
  fi
  log "$name: corelay-loadgen $* --target $TARGETS"
  "${lg_cpus[@]}" "$lg" "$@" --target "$TARGETS" --secret "$SECRET" --threads "$THREADS" --no-progress \
    "${pid_args[@]}" --label "$name" >"$runs/$name.txt" 2>"$runs/$name.err" || {
    echo "run $name failed:" >&2; cat "$runs/$name.err" "$runs/$name.txt" >&2; }
  end=$EPOCHREALTIME
  tail -n 1 "$runs/$name.txt" >"$runs/$name.json"
  sed '$d' "$runs/$name.txt" >&2
  if [ -n "$sampler" ]; then
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    cpu_ticks "${REDIS_PIDS[@]}" >>"$runs/$name.redis-cpu" || true
    redis_window "$name" "$end" || log "$name: no Redis CPU figure (see $runs/$name.redis-cpu)"
  fi
}

if [ -n "${CAPACITY:-}" ]; then
  CAP_START=${CAP_START:-2000}
  CAP_MAX=${CAP_MAX:-60000}
  CAP_P99_MS=${CAP_P99_MS:-50}
  CAP_PRECISION_PCT=${CAP_PRECISION_PCT:-10}
  CAP_RUNS=${CAP_RUNS:-1}

  # passes NAME: whether run NAME met the criterion (a missing or broken JSON fails).
  passes() {
    node -e '
      const d = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
      const ok = d.sent > 0 && d.loss === 0 && d.order_violations === 0 && d.errors === 0
        && typeof d.delivery_p99_ms === "number" && d.delivery_p99_ms <= Number(process.argv[2]);
      process.exit(ok ? 0 : 1);' "$runs/$1.json" "$CAP_P99_MS" 2>/dev/null
  }

  # try_rate SETUP RATE: CAP_RUNS fanout runs at RATE (the first named SETUP-fanout-RATE,
  # the next ones -r2, -r3, …); returns whether every one passed. After a failure the
  # setup is restarted (a saturated server may still be working off its backlog).
  try_rate() {
    local k name
    for k in $(seq "$CAP_RUNS"); do
      name="$1-fanout-$2"
      [ "$k" -eq 1 ] || name="$name-r$k"
      run_lg "$name" fanout -c "$CONNS" -m "$ROOM" --rate "$2" \
        --warmup "$WARMUP" --duration "$DURATION" --grace "$GRACE" --hdr-out "$runs/$name.hdr"
      if ! passes "$name"; then
        log "$name failed"
        cp "$runs/$name.json" "$runs/$1-fanout-$2.failed.json" 2>/dev/null || true
        cp "$runs/$name.redis.json" "$runs/$1-fanout-$2.failed.redis.json" 2>/dev/null || true
        stop_setup
        setup_up "$1" || setup_dead=1
        return 1
      fi
      log "$name passed"
    done
    return 0
  }

  for setup in $setups; do
    rm -f "$runs/$setup-capacity.txt"
    setup_up "$setup" || continue
    setup_dead=""
    lo=0 hi=0 rate=$CAP_START
    while [ "$rate" -le "$CAP_MAX" ]; do
      if try_rate "$setup" "$rate"; then lo=$rate; else hi=$rate; break; fi
      rate=$(( rate * 3 / 2 ))
    done
    while [ -z "$setup_dead" ] && [ "$lo" -gt 0 ] && [ "$hi" -gt 0 ] && [ $(( (hi - lo) * 100 )) -gt $(( lo * CAP_PRECISION_PCT )) ]; do
      rate=$(( (lo + hi) / 2 ))
      if try_rate "$setup" "$rate"; then lo=$rate; else hi=$rate; fi
    done
    stop_setup
    echo "$lo $hi" >"$runs/$setup-capacity.txt"
    log "$setup: passes at $lo msg/s, first failure at $hi (0: none)"
  done
  files=()
  for setup in $setups; do
    [ -s "$runs/$setup-capacity.txt" ] || continue
    read -r lo _ <"$runs/$setup-capacity.txt"
    [ -s "$runs/$setup-fanout-$lo.hdr" ] && files+=("$runs/$setup-fanout-$lo.hdr")
  done
  [ ${#files[@]} -gt 0 ] && "$lg" plot "${files[@]}" --out "$runs/capacity.svg" \
    --title "delivery latency of each setup at its capacity, $CONNS connections, rooms of $ROOM" >/dev/null

  node - "$runs" "$out" "$setups" "--shards $SHARDS --store $STORE${pin_args:+ ${pin_args[*]}}" "$THREADS" "$CAP_P99_MS" "$CAP_MAX" "$cpu_note" "$CAP_RUNS" <<'EOF'
const fs = require('fs');
const path = require('path');
const os = require('os');
const [runs, out, setupsArg, corelayArgs, lgThreads, p99Max, capMax, cpuNote, capRuns] = process.argv.slice(2);
const setups = setupsArg.split(/\s+/).filter(Boolean);
// A run's JSON, with the Redis CPU figures compare.sh adds (RUN.redis.json) merged in.
const load = (name) => {
  let r;
  try { r = JSON.parse(fs.readFileSync(path.join(runs, name + '.json'), 'utf8')); }
  catch (_) { return null; }
  try { Object.assign(r, JSON.parse(fs.readFileSync(path.join(runs, name + '.redis.json'), 'utf8'))); }
  catch (_) {}
  return r;
};
// Each master's share of the cluster's Redis CPU, "34/33/33 %" (only with several).
const shares = (r) => (r && Array.isArray(r.redis_cpu_share_pct) && r.redis_cpu_share_pct.length > 1
  ? r.redis_cpu_share_pct.map((v) => (typeof v === 'number' ? v.toFixed(0) : '?')).join('/') + ' %' : '–');
const notStarted = (s) => {
  try { return fs.readFileSync(path.join(runs, `${s}.not-started`), 'utf8').trim().split('\n').pop(); }
  catch (_) { return null; }
};
const num = (v, d = 2) => (typeof v === 'number' ? (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(d)) : '–');
const why = (r) => {
  if (!r) return 'no result';
  const w = [];
  if (r.loss) w.push(`loss ${r.loss}`);
  if (r.order_violations) w.push(`${r.order_violations} out of order`);
  if (r.errors) {
    const kinds = Object.entries(r.error_kinds || {}).map(([k, n]) => `${k} ${n}`).join(', ');
    w.push(`${r.errors} errors${kinds ? ` (${kinds})` : ''}`);
  }
  if (typeof r.delivery_p99_ms === 'number' && r.delivery_p99_ms > Number(p99Max)) w.push(`p99 ${num(r.delivery_p99_ms)} ms`);
  if (typeof r.send_lag_p99_ms === 'number') w.push(`(loadgen: sends late p99 ${num(r.send_lag_p99_ms)} ms, read lag ${num(r.loadgen_lag_ms)} ms)`);
  return w.join(', ') || 'failed';
};
let md = `<!-- generated by loadgen/compare.sh (CAPACITY=1) on ${new Date().toISOString()} -->\n`;
md += `Machine: ${os.cpus().length} cores (${os.cpus()[0] ? os.cpus()[0].model : '?'}), ${Math.round(os.totalmem() / 2 ** 30)} GiB; `;
md += `servers and load generator on the same machine${cpuNote ? ` (${cpuNote})` : ''}, loopback only. Load generator: corelay-loadgen with ${lgThreads} worker thread(s); `;
md += `corelay: \`${corelayArgs}\`. Capacity: the highest paced rate with zero loss, no reordering, no errors and delivery p99 ≤ ${p99Max} ms`;
md += Number(capRuns) > 1 ? ` in each of ${capRuns} runs in a row (the figures are the first run's; a failing rate's are those of the run that failed). ` : '. ';
md += 'The loadgen\'s own share of the latency: how late it wrote the paced sends (p99), and how long a delivered frame waited in its sockets before it read it (mean). ';
md += 'Server CPU includes Redis (every master of the cluster for corelay-Nc). Redis CPU: the CPU time of the setup\'s Redis process(es) over the loadgen\'s measured window (sampled by compare.sh, the window placed from the loadgen\'s exit), in % of one core and per message sent (not per delivery); for a cluster, each master\'s share of it.\n\n';
md += '| setup | capacity msg/s | deliveries/s | p50 ms | p99 ms | server CPU µs/delivery | server CPU % | Redis CPU µs/message | Redis CPU % | Redis CPU per master | loadgen CPU % | loadgen: sends late p99 ms | loadgen: read lag ms | first failing rate | why it failed |\n';
md += '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n';
for (const s of setups) {
  const ns = notStarted(s);
  if (ns && !fs.existsSync(path.join(runs, `${s}-capacity.txt`))) {
    md += `| ${s} | – | – | – | – | – | – | – | – | – | – | – | – | – | did not start: ${ns.replace(/\|/g, '\\|')} |\n`;
    continue;
  }
  let lo = 0, hi = 0;
  try { [lo, hi] = fs.readFileSync(path.join(runs, `${s}-capacity.txt`), 'utf8').trim().split(/\s+/).map(Number); } catch (_) {}
  const ok = lo ? load(`${s}-fanout-${lo}`) : null;
  const bad = hi ? (load(`${s}-fanout-${hi}.failed`) || load(`${s}-fanout-${hi}`)) : null;
  const cap = lo ? (hi ? String(lo) : `≥ ${lo} (none failed up to ${capMax})`) : `< ${hi}`;
  md += `| ${s} | ${cap} | ${num(ok && ok.deliveries_per_sec)} | ${num(ok && ok.delivery_p50_ms)} | ${num(ok && ok.delivery_p99_ms)} | `;
  md += `${num(ok && ok.server_cpu_us_per_delivery)} | ${num(ok && ok.server_cpu_pct, 1)} | `;
  md += `${num(ok && ok.redis_cpu_us_per_msg)} | ${num(ok && ok.redis_cpu_pct, 1)} | ${shares(ok)} | ${num(ok && ok.loadgen_cpu_pct, 1)} | `;
  md += `${num(ok && ok.send_lag_p99_ms)} | ${num(ok && ok.loadgen_lag_ms)} | ${hi || '–'} | ${hi ? why(bad) : '–'} |\n`;
}
md += `\nPlot: \`${path.basename(runs)}/capacity.svg\` (each setup at its capacity)\n`;
fs.writeFileSync(out, md);
console.log(md);
EOF
  log "wrote $out (runs in $runs)"
  exit 0
fi

for setup in $setups; do
  # No figures left from an earlier run into the same OUT if this setup does not start.
  rm -f "$runs/$setup"-{fanout-*,allsend,connect}.{json,redis.json}
  setup_up "$setup" || continue
  for rate in $RATES; do
    run_lg "$setup-fanout-$rate" fanout -c "$CONNS" -m "$ROOM" --rate "$rate" \
      --warmup "$WARMUP" --duration "$DURATION" --grace "$GRACE" --hdr-out "$runs/$setup-fanout-$rate.hdr"
  done
  stop_setup
  if [ -n "$ALL_SENDERS_RATE" ] && setup_up "$setup"; then
    run_lg "$setup-allsend" fanout -c "$CONNS" -m "$ROOM" --senders "$CONNS" --rate "$ALL_SENDERS_RATE" \
      --warmup "$WARMUP" --duration "$DURATION" --grace "$GRACE" --hdr-out "$runs/$setup-allsend.hdr"
    stop_setup
  fi
  # A fresh server for the memory figure.
  if [ -n "$CONNECT_CONNS" ] && [ "$CONNECT_CONNS" != 0 ] && setup_up "$setup"; then
    run_lg "$setup-connect" connect -c "$CONNECT_CONNS" --hold "$HOLD" \
      --hdr-out "$runs/$setup-connect.hdr"
    stop_setup
  fi
done

for rate in $RATES; do
  rm -f "$runs/latency-$rate.svg"
  files=()
  for setup in $setups; do
    [ -s "$runs/$setup-fanout-$rate.hdr" ] && files+=("$runs/$setup-fanout-$rate.hdr")
  done
  [ ${#files[@]} -gt 0 ] && "$lg" plot "${files[@]}" --out "$runs/latency-$rate.svg" \
    --title "delivery latency, $CONNS connections, rooms of $ROOM, $rate msg/s" >/dev/null
done

# --- table -------------------------------------------------------------------------------
node - "$runs" "$out" "$RATES" "$setups" "--shards $SHARDS --store $STORE${pin_args:+ ${pin_args[*]}}" "$THREADS" "$ALL_SENDERS_RATE" "${pin_args[*]}" "$cpu_note" "$CLUSTER_MASTERS" <<'EOF'
const fs = require('fs');
const path = require('path');
const os = require('os');
const [runs, out, ratesArg, setupsArg, corelayArgs, lgThreads, allRate, pinArg, cpuNote, clusterMasters] = process.argv.slice(2);
const rates = ratesArg.split(/\s+/).filter(Boolean);
const setups = setupsArg.split(/\s+/).filter(Boolean);
const peers = setups.filter((s) => s.startsWith('peer-'));
// Ratio columns: single-process corelay against each peer setup, the corelay cluster of
// N processes (through one Redis, or through the Redis Cluster) against the peer of N
// processes, and the Redis Cluster against one Redis (corelay-Nc / corelay-N).
const pairs = peers.filter(() => setups.includes('corelay')).map((p) => ['corelay', p]);
for (const s of setups.filter((s) => /^corelay-\d+c?$/.test(s))) {
  const p = 'peer-' + s.slice('corelay-'.length).replace(/c$/, '');
  if (setups.includes(p)) pairs.push([s, p]);
}
for (const s of setups.filter((s) => /^corelay-\d+c$/.test(s))) {
  const one = s.slice(0, -1);
  if (setups.includes(one)) pairs.push([s, one]);
}
// A run's JSON, with the Redis CPU figures compare.sh adds (RUN.redis.json) merged in,
// and each master's share of the cluster's Redis CPU as text ("34/33/33 %").
const load = (name) => {
  let r;
  try { r = JSON.parse(fs.readFileSync(path.join(runs, name + '.json'), 'utf8')); }
  catch (_) { return null; }
  try { Object.assign(r, JSON.parse(fs.readFileSync(path.join(runs, name + '.redis.json'), 'utf8'))); }
  catch (_) {}
  if (Array.isArray(r.redis_cpu_share_pct) && r.redis_cpu_share_pct.length > 1) {
    r.redis_cpu_shares = r.redis_cpu_share_pct.map((v) => (typeof v === 'number' ? v.toFixed(0) : '?')).join('/') + ' %';
  }
  return r;
};
const notStarted = (s) => {
  try { return fs.readFileSync(path.join(runs, `${s}.not-started`), 'utf8').trim().split('\n').pop(); }
  catch (_) { return null; }
};
const fmt = (v, d = 2) => (v === null || v === undefined || Number.isNaN(v) ? '–'
  : typeof v === 'number' ? (Number.isInteger(v) || Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(d)) : String(v));
const ratio = (a, b) => (typeof a === 'number' && typeof b === 'number' && b !== 0 ? (a / b).toFixed(2) + '×' : '–');
const metrics = [
  ['deliveries/s', 'deliveries_per_sec'],
  ['delivery p50 ms', 'delivery_p50_ms'],
  ['delivery p99 ms', 'delivery_p99_ms'],
  ['delivery p99.9 ms', 'delivery_p999_ms'],
  ['delivery max ms', 'delivery_max_ms'],
  ['ack p50 ms', 'ack_p50_ms'],
  ['ack p99 ms', 'ack_p99_ms'],
  ['loss', 'loss'],
  ['order violations', 'order_violations'],
  ['errors', 'errors'],
  ['server CPU %', 'server_cpu_pct'],
  ['server CPU µs/delivery', 'server_cpu_us_per_delivery'],
  ['server user-space µs/delivery', 'server_user_us_per_delivery'],
  ['server RSS KiB', 'server_rss_kib'],
  ['Redis CPU %', 'redis_cpu_pct'],
  ['Redis CPU µs/message', 'redis_cpu_us_per_msg'],
  ['Redis CPU per master', 'redis_cpu_shares'],
  ['loadgen CPU %', 'loadgen_cpu_pct'],
  ['loadgen: sends late p99 ms', 'send_lag_p99_ms'],
  ['loadgen: read lag ms', 'loadgen_lag_ms'],
];
const connectMetrics = [
  ['connected', 'connected'],
  ['connect p50 ms', 'connect_p50_ms'],
  ['connect p99 ms', 'connect_p99_ms'],
  ['connects/s', 'connects_per_sec'],
  ['server RSS KiB', 'server_rss_kib'],
  ['KiB per connection', 'kib_per_connection'],
  ['errors', 'errors'],
];
const header = ['metric', ...setups, ...pairs.map(([a, b]) => `${a}/${b}`)];
const table = (rows) => [
  '| ' + header.join(' | ') + ' |',
  '|' + header.map((_, i) => (i === 0 ? '---' : '---:')).join('|') + '|',
  ...rows,
].join('\n');
const rowsFor = (ms, runName) => ms.map(([label, key]) => {
  const vals = setups.map((s) => { const r = load(runName(s)); return r ? r[key] : null; });
  const at = (s) => vals[setups.indexOf(s)];
  return '| ' + [label, ...vals.map((v) => fmt(v)), ...pairs.map(([a, b]) => ratio(at(a), at(b)))].join(' | ') + ' |';
});
// Run parameters (connections, room size, ...) from the first setup that has the run.
const any = (run) => setups.map((s) => load(`${s}-${run}`)).find((r) => r) || null;
const first = any(`fanout-${rates[0]}`) || {};
let md = `<!-- generated by loadgen/compare.sh on ${new Date().toISOString()} -->\n`;
md += `Machine: ${os.cpus().length} cores (${os.cpus()[0] ? os.cpus()[0].model : '?'}), ${Math.round(os.totalmem() / 2 ** 30)} GiB; `;
md += `servers and load generator on the same machine${cpuNote ? ` (${cpuNote})` : ''}, loopback only.\n\n`;
md += `Load generator: corelay-loadgen with ${lgThreads} worker thread(s). `;
md += `Setups: **corelay** (release build, \`${corelayArgs}\`, send limit raised); `;
md += `**corelay-N**: N corelay processes (\`--shards 1${pinArg ? ' ' + pinArg : ''}\` each) in cluster mode through one Redis (\`--store redis\`); `;
md += `**corelay-Nc**: the same through a Redis Cluster of ${clusterMasters} masters without replicas (host i given master i mod ${clusterMasters}); `;
md += `**peer-N**: the seed's stack (Node socket.io 4.8 + @socket.io/redis-adapter 8.3 + Redis) with N Node processes. `;
md += `Server CPU and RSS include Redis (every master of the cluster) for corelay-N, corelay-Nc and the peers. `;
md += `Redis CPU: the CPU time of the setup's Redis process(es) over the loadgen's measured window (sampled by compare.sh, the window placed from the loadgen's exit), `;
md += `in % of one core and per message sent (not per delivery); for a cluster, each master's share of it.\n\n`;
for (const s of setups) {
  const ns = notStarted(s);
  if (ns) md += `**${s} did not start** (or failed to restart for a run): \`${ns}\`\n\n`;
}
for (const rate of rates) {
  const r = any(`fanout-${rate}`) || first;
  md += `### fanout: ${r.connections ?? '?'} connections, rooms of ${r.room_size ?? '?'}, ${rate} msg/s `;
  md += `(${r.senders ?? '?'} senders, ${r.duration_s ?? '?'} s window)\n\n`;
  md += table(rowsFor(metrics, (s) => `${s}-fanout-${rate}`)) + '\n\n';
  if (fs.existsSync(path.join(runs, `latency-${rate}.svg`))) md += `Plot: \`${path.basename(runs)}/latency-${rate}.svg\`\n\n`;
}
if (allRate) {
  const r = any('allsend') || {};
  md += `### fanout, every member sends: ${r.connections ?? '?'} connections, rooms of ${r.room_size ?? '?'}, ${allRate} msg/s `;
  md += `(${r.senders ?? '?'} senders, ${r.duration_s ?? '?'} s window)\n\n`;
  md += table(rowsFor(metrics.concat([['order reorders', 'order_reorders'], ['order gaps', 'order_gaps']]), (s) => `${s}-allsend`)) + '\n\n';
}
const c = any('connect');
if (c) {
  md += `### connect: ${c.connections ?? '?'} idle connections held ${c.duration_s ?? '?'} s\n\n`;
  md += table(rowsFor(connectMetrics, (s) => `${s}-connect`)) + '\n';
}
fs.writeFileSync(out, md);
console.log(md);
EOF
log "wrote $out (runs in $runs)"
