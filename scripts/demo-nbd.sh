#!/usr/bin/env bash
# Stagehand storage demo (make demo-nbd): stagehand-nbd alone. Starts it on a sparse
# image, proves it with nbdinfo and a qemu-img round trip, then tells you what to try.
# Cleans up (server, temporary files) on exit and on Ctrl-C.
set -euo pipefail

BIN="${STAGEHAND_BIN_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/stagehand/target}/release}"
NBD="$BIN/stagehand-nbd"
[ -x "$NBD" ] || { echo "demo: $NBD not built; run 'make demo-nbd' (it builds first)" >&2; exit 1; }
for t in nbdinfo qemu-img; do
  command -v "$t" >/dev/null || { echo "demo: $t missing; run 'make deps'" >&2; exit 1; }
done

WORK="$(mktemp -d -t stagehand-demo.XXXXXX)"
PID=""
cleanup() {
  trap - EXIT INT TERM
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
  echo "demo: stopped stagehand-nbd and removed $WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

IMG="$WORK/disk.img"
PROGRESS=""
[ -t 1 ] && PROGRESS="-p"
SOCK="$WORK/nbd.sock"
truncate -s 256M "$IMG"
# stagehand-nbd refuses to start without a control API token (in a file: argv shows in ps).
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/api-token"
step "Starting stagehand-nbd on a 256 MiB sparse image"
"$NBD" --listen 127.0.0.1:0 --unix "$SOCK" --export "demo=$IMG,unleased" \
  --api-token-file "$WORK/api-token" \
  >"$WORK/stdout" 2>"$WORK/server.log" &
PID=$!
for _ in $(seq 100); do
  grep -q 'listening on unix' "$WORK/stdout" 2>/dev/null && break
  kill -0 "$PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
  sleep 0.1
done
ADDR="$(sed -n 's/^stagehand-nbd: listening on tcp //p' "$WORK/stdout")"
URI="nbd://$ADDR/demo"
echo "listening on $ADDR and $SOCK (export 'demo')"

step "nbdinfo $URI"
nbdinfo "$URI"

step "Writing 32 MiB of data through qemu-img, leaving holes"
SRC="$WORK/source.raw"
head -c 16M /dev/urandom >"$SRC"
truncate -s 128M "$SRC"
head -c 16M /dev/urandom >>"$SRC"
truncate -s 256M "$SRC"
qemu-img convert -n $PROGRESS -f raw -O raw "$SRC" "$URI"
qemu-img compare -f raw -F raw "$SRC" "$URI"

step "Allocation map as a client sees it (nbdinfo --map, base:allocation)"
nbdinfo --map "$URI"

step "Reading it all back over the Unix socket (qemu-img convert)"
qemu-img convert $PROGRESS -f raw -O raw "nbd+unix:///demo?socket=$SOCK" "$WORK/back.raw"
cmp "$SRC" "$WORK/back.raw" && echo "round trip: identical, $(du -h --apparent-size "$WORK/back.raw" | cut -f1) checked"

cat <<MSG

Demo passed: stagehand-nbd served a sparse disk to nbdinfo and qemu-img, over TCP
and a Unix socket, with holes preserved.

Try next (run "make demo-nbd" in a terminal: the server then stays up until Ctrl-C):
  nbdinfo --json $URI
  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' $URI
  nbdcopy -C 4 --progress $URI null:
  fio --name=t --ioengine=nbd --uri=$URI --rw=randread --bs=4k --iodepth=32 --runtime=5 --time_based
  make bench     # stagehand-nbd against nbdkit and qemu-nbd
MSG

if [ -t 0 ]; then
  echo
  echo "The server keeps running; press Ctrl-C to stop it and clean up."
  wait "$PID" || true
fi
