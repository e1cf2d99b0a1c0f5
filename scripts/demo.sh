#!/usr/bin/env bash
# Stagehand demo: a VM moves between two sites while it writes to its disk.
# Starts, on loopback in a temporary directory, a storage node (stagehand-nbd), two
# KVM host agents (siteA, siteB) and the coordinator; registers them with `coord`;
# creates vm7 in siteA running the disk-writer guest; live-migrates it to siteB with
# the coordinated switchover (the disk lease is fenced to the target while the guest
# is paused); prints the figures and checks the guest on the target. Everything runs
# as in production: a throwaway CA (`coord certs create`), TLS on every link (NBD
# with STARTTLS, the migration stream, HTTPS APIs), API tokens from a file, disks
# that need their lease even for reads. Cleans up on exit and on Ctrl-C.
set -euo pipefail

BIN="${STAGEHAND_BIN_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/stagehand/target}/release}"
CHECK="${STAGEHAND_CHECK_BIN:-$BIN/examples/check_disk_writer}"
for b in "$BIN/stagehand-nbd" "$BIN/stagehand-agent" "$BIN/coord" "$CHECK"; do
  [ -x "$b" ] || { echo "demo: $b not built; run 'make demo' (it builds first)" >&2; exit 1; }
done
for t in curl jq; do
  command -v "$t" >/dev/null || { echo "demo: $t missing; run 'make deps'" >&2; exit 1; }
done
if ! [ -r /dev/kvm ] || ! [ -w /dev/kvm ]; then
  echo "demo: /dev/kvm is not usable here; the agents need KVM (try 'make demo-nbd' for the storage part)" >&2
  exit 1
fi

WORK="$(mktemp -d -t stagehand-demo.XXXXXX)"
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
  echo "demo: stopped the storage node, both agents and the coordinator; removed $WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# curl against the demo's CA, with the API token.
api() { curl -sf --cacert "$PKI/ca-cert.pem" -H "Authorization: Bearer $TOKEN" "$@"; }
# Waits until URL answers 200 over HTTPS; fails with the daemon's log otherwise.
wait_up() {
  local url="$1" pid="$2" log="$3"
  for _ in $(seq 150); do
    api -m 1 -o /dev/null "$url" && return 0
    kill -0 "$pid" 2>/dev/null || { echo "demo: daemon died; its log:" >&2; cat "$log" >&2; exit 1; }
    sleep 0.1
  done
  echo "demo: $url did not come up; log:" >&2
  cat "$log" >&2
  exit 1
}

TOKEN="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
(umask 077; printf '%s\n' "$TOKEN" > "$WORK/api-token")
mkdir -p "$WORK/nbd-data" "$WORK/images"
PKI="$WORK/pki"
tls() { echo --tls-cert "$PKI/$1/server-cert.pem" --tls-key "$PKI/$1/server-key.pem" --tls-ca "$PKI/ca-cert.pem"; }

step "Making a throwaway CA and a certificate per daemon (TLS on every link)"
run "$BIN/coord" certs create --out "$PKI" --node nbd-a1 --node kvm-a1 --node kvm-b1 --node coord

step "Starting a storage node, two agents (siteA, siteB) and the coordinator on loopback"
NBD_PORT="$(free_port)"; NBD_API="$(free_port)"
"$BIN/stagehand-nbd" --listen "127.0.0.1:$NBD_PORT" --api "127.0.0.1:$NBD_API" \
  --data-dir "$WORK/nbd-data" --api-token-file "$WORK/api-token" $(tls nbd-a1) \
  >/dev/null 2>"$WORK/nbd.log" &
PIDS+=($!)
wait_up "https://127.0.0.1:$NBD_API/v1/health" "$!" "$WORK/nbd.log"
echo "stagehand-nbd     nbd 127.0.0.1:$NBD_PORT (TLS required), api https://127.0.0.1:$NBD_API"
declare -A AGENT_API AGENT_MIG
for host in kvm-a1 kvm-b1; do
  AGENT_API[$host]="127.0.0.1:$(free_port)"
  AGENT_MIG[$host]="127.0.0.1:$(free_port)"
  mkdir -p "$WORK/$host"
  "$BIN/stagehand-agent" --api "${AGENT_API[$host]}" --migration-listen "${AGENT_MIG[$host]}" \
    --host-id "$host" --data-dir "$WORK/$host" --images-dir "$WORK/images" \
    --api-token-file "$WORK/api-token" $(tls "$host") >/dev/null 2>"$WORK/$host.log" &
  PIDS+=($!)
  wait_up "https://${AGENT_API[$host]}/v1/health" "$!" "$WORK/$host.log"
  echo "stagehand-agent   $host: api https://${AGENT_API[$host]}, migration ${AGENT_MIG[$host]} (TLS)"
done
COORD_API="127.0.0.1:$(free_port)"
"$BIN/coord" serve --api "$COORD_API" --data-dir "$WORK/coord" \
  --api-token-file "$WORK/api-token" $(tls coord) >/dev/null 2>"$WORK/coord.log" &
PIDS+=($!)
wait_up "https://$COORD_API/v1/health" "$!" "$WORK/coord.log"
echo "coord serve       api https://$COORD_API"
export STAGEHAND_COORDINATOR="https://$COORD_API" STAGEHAND_TOKEN="$TOKEN" STAGEHAND_CA="$PKI/ca-cert.pem"
PATH="$BIN:$PATH"

step "Registering sites, the storage node (reachable from both sites) and the hosts"
run coord site add siteA
run coord site add siteB
run coord storage add nbd-a1 --site siteA --api "https://127.0.0.1:$NBD_API" \
  --nbd "127.0.0.1:$NBD_PORT" --reachable-from siteB
run coord host add kvm-a1 --site siteA --api "https://${AGENT_API[kvm-a1]}" \
  --migration "${AGENT_MIG[kvm-a1]}" --memory 1G
run coord host add kvm-b1 --site siteB --api "https://${AGENT_API[kvm-b1]}" \
  --migration "${AGENT_MIG[kvm-b1]}" --memory 1G

step "Creating vm7 in siteA: the disk-writer guest, 128 MiB, a 64 MiB leased disk"
stagehand-agent guest-image disk-writer --out "$WORK/images/disk-writer.bin" >/dev/null
run coord vm create vm7 --site siteA --memory 128M --image "$WORK/images/disk-writer.bin" --disk 64M
run coord vm show vm7
console() { api "https://${AGENT_API[$1]}/v1/vms/vm7/console" | wc -c; }
for _ in $(seq 100); do [ "$(console kvm-a1)" -gt 1 ] && break; sleep 0.1; done
echo "console on kvm-a1: $(console kvm-a1) bytes ('A' at start, then a 'W' every 4096 disk records)"
# The disk's current lease token, from the coordinator's own state (the API never shows it).
lease() { coord lease-tokens vm7 --data-dir "$WORK/coord" | jq -r '.[0].token'; }
# Pauses the guest, dumps its RAM, reads its disk under the lease over NBD+TLS, checks
# every acknowledged record and the RAM pattern, resumes it.
check() {
  STAGEHAND_TLS_DIR="$PKI/coord" STAGEHAND_LEASE_TOKEN="$(lease)" \
    "$CHECK" "https://${AGENT_API[$1]}" vm7 "127.0.0.1:$NBD_PORT" vm7-disk0 "$WORK/$1"
}
check kvm-a1
if command -v nbdinfo >/dev/null; then
  echo "what others get from the storage node:"
  if nbdinfo "nbd://127.0.0.1:$NBD_PORT/vm7-disk0" >/dev/null 2>&1; then
    echo "demo: a plain NBD client read the disk" >&2; exit 1
  fi
  echo "  plain NBD (no TLS): refused"
  if nbdinfo "nbds://127.0.0.1:$NBD_PORT/vm7-disk0?tls-certificates=$PKI/coord" >/dev/null 2>&1; then
    echo "demo: a TLS client without the lease opened the disk" >&2; exit 1
  fi
  echo "  NBD over TLS with a cluster certificate but without the disk's lease: refused"
fi

step "Live-migrating vm7 to siteB (coordinated switchover: fence the disk while paused)"
run coord migrate vm7 --to siteB --wait
ID="$(coord --json migration list | jq -r '.[-1].id')"
run coord migration show "$ID"

step "Checking the guest on the target (kvm-b1)"
run coord vm show vm7
[ "$(curl -s --cacert "$PKI/ca-cert.pem" -H "Authorization: Bearer $TOKEN" "https://${AGENT_API[kvm-a1]}/v1/vms/vm7" -o /dev/null -w '%{http_code}' || true)" = 404 ] \
  && echo "kvm-a1 has no copy left"
check kvm-b1
c1="$(console kvm-b1)"
echo "console on kvm-b1: $c1 bytes; waiting for the guest's next 'W' (4096 more records)..."
for _ in $(seq 200); do
  c2="$(console kvm-b1)"
  [ "$c2" -gt "$c1" ] && break
  sleep 0.1
done
[ "$c2" -gt "$c1" ] || { echo "demo: the guest's console did not grow on the target" >&2; exit 1; }
echo "console on kvm-b1: $c2 bytes: $(api "https://${AGENT_API[kvm-b1]}/v1/vms/vm7/console")"

cat <<MSG

Demo passed: vm7 moved from siteA to siteB while writing to its disk; the storage node
fenced the disk to kvm-b1 under a new epoch while the guest was paused, and every
record the guest saw acknowledged is on the disk. Every link was TLS with
certificates from the demo's CA.

Try next (from another terminal while the demo keeps running here: export STAGEHAND_COORDINATOR=$STAGEHAND_COORDINATOR STAGEHAND_TOKEN=$TOKEN STAGEHAND_CA=$STAGEHAND_CA PATH=$BIN:\$PATH):
  coord migrate vm7 --to siteA --wait          # and back
  coord migrate vm7 --to siteA --offline --wait
  coord migration list
  coord vm list
  curl -s --cacert $PKI/ca-cert.pem -H "Authorization: Bearer $TOKEN" https://$COORD_API/metrics
  make bench-migrate                           # the agents against QEMU, measured
MSG

if [ -t 0 ]; then
  echo
  echo "Everything keeps running; press Ctrl-C to stop it and clean up."
  wait "${PIDS[0]}" || true
fi
