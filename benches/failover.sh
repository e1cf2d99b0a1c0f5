#!/usr/bin/env bash
# Coordinator leader failover on etcd (issue 13): a three-member etcd cluster and two
# `coord serve` on loopback; KILLS times, kill -9 the leader and time from the kill to
# the first write (`coord site add`) the other coordinator accepts, polling every
# 20 ms; then restart the killed one (it follows) and wait until it answers. Prints
# every figure, then p50 / p99 / max. The lease is --election-ttl (default 2 s): the
# failover is bounded below by it (the dead leader's key lives until its lease ends).
# Usage: STAGEHAND_BIN_DIR=target/release benches/failover.sh  (make bench-failover)
set -euo pipefail

BIN_DIR="${STAGEHAND_BIN_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/stagehand/target}/release}"
COORD="$BIN_DIR/coord"
KILLS="${KILLS:-20}"
TTL="${TTL:-2}"
for tool in etcd curl jq python3; do
  command -v "$tool" >/dev/null || { echo "failover.sh: $tool missing (make deps)" >&2; exit 1; }
done
[ -x "$COORD" ] || { echo "failover.sh: $COORD missing (make build)" >&2; exit 1; }

work="$(mktemp -d /tmp/stagehand-failover.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}" "${cpid[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }

cl=(); pe=(); initial=""
for i in 0 1 2; do cl[$i]=$(port); pe[$i]=$(port); initial+="${initial:+,}e$i=http://127.0.0.1:${pe[$i]}"; done
for i in 0 1 2; do
  etcd --name "e$i" --data-dir "$work/e$i" \
    --listen-client-urls "http://127.0.0.1:${cl[$i]}" --advertise-client-urls "http://127.0.0.1:${cl[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${pe[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${pe[$i]}" \
    --initial-cluster "$initial" --initial-cluster-state new --heartbeat-interval 50 --election-timeout 500 \
    2>"$work/e$i.log" &
  pids+=($!)
done
store="etcd://127.0.0.1:${cl[0]},127.0.0.1:${cl[1]},127.0.0.1:${cl[2]}"
for i in 0 1 2; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:${cl[$i]}/health" | grep -q true && break; sleep 0.1; done
done

TOKEN=failover-bench-token-0123456789
export STAGEHAND_TOKEN=$TOKEN
api=("127.0.0.1:$(port)" "127.0.0.1:$(port)")
cpid=("" "")
start_coord() {
  "$COORD" serve --api "${api[$1]}" --store "$store" --name "c$1" --election-ttl "$TTL" \
    --data-dir "$work/c$1" --api-token "$TOKEN" >/dev/null 2>>"$work/c$1.log" &
  cpid[$1]=$!
  for _ in $(seq 100); do curl -sf "http://${api[$1]}/v1/health" >/dev/null && return; sleep 0.05; done
  echo "failover.sh: coordinator c$1 did not start (see $work/c$1.log)" >&2; exit 1
}
leader() {
  "$COORD" --coordinator "http://${api[$1]}" --json status 2>/dev/null | jq -r '.leader.id // ""'
}
start_coord 0
for _ in $(seq 100); do [ "$(leader 0)" = c0 ] && break; sleep 0.05; done
start_coord 1
"$COORD" --coordinator "http://${api[0]}" site add warmup >/dev/null

figures=()
for n in $(seq "$KILLS"); do
  l=""
  for _ in $(seq 200); do l=$(leader 0); [ -z "$l" ] && l=$(leader 1); [ -n "$l" ] && break; sleep 0.05; done
  k=${l#c}; o=$((1 - k))
  # The survivor knows the leader (so it forwards) before the kill.
  for _ in $(seq 200); do [ "$(leader "$o")" = "$l" ] && break; sleep 0.05; done
  t0=$(now_ms)
  kill -9 "${cpid[$k]}"; wait "${cpid[$k]}" 2>/dev/null || true
  until "$COORD" --coordinator "http://${api[$o]}" site add "s$n" >/dev/null 2>&1; do sleep 0.02; done
  ms=$(( $(now_ms) - t0 ))
  figures+=("$ms")
  echo "kill $n: leader c$k killed, c$o accepted a write after $ms ms"
  start_coord "$k"
done

printf '%s\n' "${figures[@]}" | sort -n | python3 -c '
import sys
v = [int(x) for x in sys.stdin.read().split()]
def pct(p):
    i = min(len(v) - 1, max(0, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[i]
print(f"failover over {len(v)} kills (election-ttl '"$TTL"' s): p50 {pct(50)} ms, p99 {pct(99)} ms, max {v[-1]} ms")
'
