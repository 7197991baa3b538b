#!/bin/bash
# The flood of issue 21: a 30 s fan-out at ~3x capacity (2,000 connections in rooms of 10,
# 100,000 msg/s), then normal load (10,000 msg/s, 10 s) on the same server right after.
# Samples the server's VmRSS/VmHWM and /metrics queued bytes every 0.5 s.
#
#   STORE=embedded loadgen/flood.sh OUT_DIR BIN_DIR [VAR=value ...]
#
# With BASELINE=1 the normal load also runs once before the flood (baseline.txt), on the
# same server, so that "after" has a "before" to be read against.
# BIN_DIR holds corelay and corelay-loadgen (a release build); VAR=value pairs go to the
# server's environment (e.g. CORELAY_SERVER_DATA_DIR=/tmp/x for the embedded store).
# Writes flood.txt, normal.txt (and baseline.txt; the loadgen's output, its JSON last), rss.txt,
# hwm-after-flood.txt, hwm-final.txt, healthz-after-flood.json, metrics-after-flood.txt.
set -u
OUT=$1; BIN=$2; shift 2
mkdir -p "$OUT"
S=0123456789abcdef0123
PORT=18931
ulimit -n 65536 2>/dev/null
env "$@" CORELAY_JWT_SECRET=$S CORELAY_LIMITS_SEND_RATE=100000 CORELAY_LIMITS_SEND_BURST=100000 \
  RUST_LOG=warn $BIN/corelay serve --listen 127.0.0.1:$PORT --shards 2 --store ${STORE:-memory} --no-pin \
  > $OUT/server.log 2>&1 &
SPID=$!
sleep 1
( while kill -0 $SPID 2>/dev/null; do
    q=$(curl -s -m 1 127.0.0.1:$PORT/metrics | awk '/^corelay_queued_bytes/ {s+=$2} /^corelay_memory_pressure/ {p+=$2} /^corelay_queue_bytes/ {split($1, a, "queue=\""); sub(/".*/, "", a[2]); b[a[2]]+=$2} END {printf "queued %d pressured %d", s, p; for (k in b) printf " %s %d", k, b[k]}')
    echo "$(date +%s.%N) $(grep -E 'VmRSS|VmHWM' /proc/$SPID/status | tr -s ' ' | tr '\n' ' ') $q"; sleep 0.5
  done ) > $OUT/rss.txt &
WPID=$!
normal() {
  $BIN/corelay-loadgen fanout --target 127.0.0.1:$PORT --secret $S -c 2000 -m 10 --rate 10000 \
    --warmup 2s --duration 10s --grace 2s --server-pid $SPID --no-progress > $OUT/$1.txt 2>&1
  echo "$1 exit $?" >> $OUT/$1.txt
}
if [ "${BASELINE:-0}" = 1 ]; then normal baseline; fi
$BIN/corelay-loadgen fanout --target 127.0.0.1:$PORT --secret $S -c 2000 -m 10 --rate 100000 \
  --warmup 2s --duration 30s --grace 5s --server-pid $SPID --no-progress > $OUT/flood.txt 2>&1
echo "flood exit $?" >> $OUT/flood.txt
grep VmHWM /proc/$SPID/status > $OUT/hwm-after-flood.txt
curl -s 127.0.0.1:$PORT/healthz > $OUT/healthz-after-flood.json
curl -s 127.0.0.1:$PORT/metrics | grep -E '^corelay_(queued_bytes|memory|budget|slow_consumer)' > $OUT/metrics-after-flood.txt
normal normal
grep VmHWM /proc/$SPID/status > $OUT/hwm-final.txt
kill $SPID; wait $SPID 2>/dev/null; kill $WPID 2>/dev/null
echo done
