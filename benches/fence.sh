#!/usr/bin/env bash
# Fence benchmark (issue 3), two figures:
#  1. throughput cost of the lease check on the data path: the same fio random-write
#     workload (ioengine=nbd, 4 jobs, qd 16) against a leased export (with its token)
#     and an unleased export of the SAME file, ROUNDS alternating runs of RUNTIME s
#     each, `sync` before each run, median IOPS, printed as a ratio.
#  2. fence latency while 8 NBD connections (fio, one connection per job, queue
#     depth 16 each) are busy writing with the current epoch's token: POST /fence is
#     timed by a control client on a kept-alive HTTP connection (fence_latency.py)
#     from request to answer; p50 / p99 / max over FENCES fences, plus the server's
#     own breakdown (persist = fdatasync of the new epoch, drain = wait for
#     older-epoch writes in flight; they run concurrently). Each fence kills the
#     writers (NBD_EPERM, then close), so every round starts a fresh fio. Two cases:
#     the export on tmpfs, and on the same disk as --data-dir.
# Usage: STAGEHAND_BIN_DIR=target/release benches/fence.sh  (make bench-fence)
set -euo pipefail

BIN_DIR="${STAGEHAND_BIN_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/stagehand/target}/release}"
SERVER="$BIN_DIR/stagehand-nbd"
FENCES="${FENCES:-200}"
ROUNDS="${ROUNDS:-7}"
RUNTIME="${RUNTIME:-3}"
SIZE_MIB="${SIZE_MIB:-256}"
PY=/usr/bin/python3

for tool in fio curl "$PY"; do
  command -v "$tool" >/dev/null || { echo "fence.sh: $tool missing (make deps)" >&2; exit 1; }
done
[ -x "$SERVER" ] || { echo "fence.sh: $SERVER missing (make build)" >&2; exit 1; }

if [ -x "$BIN_DIR/fence-gate" ]; then
  echo "== the lease check alone (benches/src/bin/fence-gate.rs)"
  "$BIN_DIR/fence-gate"
fi

work="$(mktemp -d /tmp/stagehand-fence.XXXXXX)"
shm=""
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
  [ -n "$shm" ] && rm -rf "$shm"
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NBD_PORT="$(free_port)"
API_PORT="$(free_port)"
API="http://127.0.0.1:$API_PORT"

# One fully allocated file behind both exports, so that the leased and the unleased
# runs find the same page cache and writeback state.
dd if=/dev/zero of="$work/disk.img" bs=1M count="$SIZE_MIB" status=none
shm="$(mktemp -d -p /dev/shm stagehand-fence.XXXXXX)"
dd if=/dev/zero of="$shm/disk.img" bs=1M count="$SIZE_MIB" status=none

# The API token stays in files (not in argv, where ps shows it).
"$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$work/api-token"
printf 'Authorization: Bearer %s\n' "$(cat "$work/api-token")" >"$work/auth-header"
export STAGEHAND_API_TOKEN_FILE="$work/api-token"

NO_COLOR=1 RUST_LOG=info "$SERVER" --listen "127.0.0.1:$NBD_PORT" --api "127.0.0.1:$API_PORT" \
  --data-dir "$work/data" --api-token-file "$work/api-token" \
  --export "leased=$work/disk.img" --export "unleased=$work/disk.img,unleased" \
  --export "leased-shm=$shm/disk.img" --export "unleased-shm=$shm/disk.img,unleased" \
  2>"$work/server.log" >/dev/null &
server_pid=$!
for _ in $(seq 200); do
  curl -sf "$API/v1/health" >/dev/null && break
  sleep 0.05
done
curl -sf "$API/v1/health" >/dev/null || { echo "fence.sh: server did not start" >&2; exit 1; }

fence() { # fence EPOCH EXPORT -> prints the new TOKEN (fence_latency.py times fences)
  curl -sf -H @"$work/auth-header" -X POST "$API/v1/exports/$2/fence" -d "{\"epoch\": $1, \"holder\": \"bench-$1\"}" \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}

fio_iops() { # fio_iops URI RUNTIME JOBS -> write IOPS
  # fio's nbd engine prints to stdout too, so the JSON goes to a file.
  fio --name=w --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=16 \
    --numjobs="$3" --size="$((SIZE_MIB / 4))M" --time_based --runtime="$2" \
    --group_reporting --output-format=json --output="$work/fio.json" >/dev/null 2>&1
  "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"])' "$work/fio.json"
}

echo "== lease check cost: fio nbd randwrite 4k, qd 16, 4 jobs, ${RUNTIME}s, $ROUNDS rounds each, export on tmpfs (as in make bench), order alternating"
token="$(fence 1 leased-shm)"
: >"$work/iops"
for round in $(seq "$ROUNDS"); do
  # ABBA: the kind that runs first alternates, so neither always finds the other's
  # leftovers (page cache, writeback, CPU frequency) before it.
  kinds="leased unleased"; [ $((round % 2)) -eq 0 ] && kinds="unleased leased"
  for kind in $kinds; do
    if [ "$kind" = leased ]; then uri="nbd://127.0.0.1:$NBD_PORT/leased-shm;lease=$token"; else uri="nbd://127.0.0.1:$NBD_PORT/unleased-shm"; fi
    sync  # start every run with no dirty pages of the previous one
    iops="$(fio_iops "$uri" "$RUNTIME" 4)"
    echo "$kind $iops" >>"$work/iops"
    echo "  round $round $kind: $iops IOPS"
  done
done
"$PY" - "$work/iops" <<'EOF'
import statistics, sys
runs = {}
pairs = []
for line in open(sys.argv[1]):
    kind, iops = line.split()
    runs.setdefault(kind, []).append(float(iops))
    if len(runs.get("leased", [])) == len(runs.get("unleased", [])):
        pairs.append(runs["leased"][-1] / runs["unleased"][-1])
l, u = statistics.median(runs["leased"]), statistics.median(runs["unleased"])
print(f"median IOPS: leased {l:.0f}, unleased {u:.0f}; leased/unleased = {l / u:.4f} (cost {100 * (1 - l / u):+.2f} %, target < 2 %)")
p = statistics.median(pairs)
print(f"median of the per-round ratios: {p:.4f} (cost {100 * (1 - p):+.2f} %); rounds: " + " ".join(f"{x:.3f}" for x in pairs))
EOF

# Fence latency, twice: with the export on tmpfs (as in `make bench`: the data
# dir's disk sees only the fence's own write) and on the data dir's disk (the
# writers' dirty pages are written back to the same device the fence flushes).
fence_case() { # fence_case EXPORT FIRST_EPOCH LABEL
  echo "== fence latency, export $3: 8 connections writing (fio nbd, randwrite 4k, qd 16 each), $FENCES fences"
  local before
  before="$(wc -l <"$work/server.log")"
  "$PY" "$(dirname "$0")/fence_latency.py" "$API" "$NBD_PORT" "$1" "$2" "$FENCES" "$SIZE_MIB"
  tail -n +"$((before + 1))" "$work/server.log" | grep "export=$1 " >"$work/server.case.log" || true
  server_breakdown "$work/server.case.log"
}
server_breakdown() {
"$PY" - "$1" <<'EOF'
import re, sys
rows = [l for l in open(sys.argv[1]) if "fenced" in l and "persist_us" in l]
def col(name):
    xs = sorted(int(re.search(name + r"\D*?(\d+)", l).group(1)) / 1000 for l in rows)
    return f"p50 {xs[len(xs) // 2]:.3f}  p99 {xs[min(len(xs) - 1, int(0.99 * len(xs)))]:.3f}  max {xs[-1]:.3f}"
print(f"server side over {len(rows)} fences (ms): total {col('latency_us')}")
print(f"  of which, concurrently: persist (fdatasync) {col('persist_us')};  drain of in-flight writes {col('drain_us')}")
EOF
}
fence_case leased-shm 2 "on tmpfs"
fence_case leased 1 "on the data dir's disk"
