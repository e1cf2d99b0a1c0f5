#!/usr/bin/env bash
# stagehand-nbd against nbdkit (file plugin) and qemu-nbd, over the same 1 GiB image
# on tmpfs, with the same fio nbd-engine workloads and nbdcopy to null:, in ROUNDS
# interleaved rounds (the servers' order rotates each round); prints the median of
# each figure and stagehand's ratio to the best peer (>1 is better). Single runs
# on this 2-core VM swing by +-20 %, which medians over rounds damp.
#
#   ROUNDS=3 RUNTIME=5 bash benches/nbd-peers.sh   (seconds per fio workload)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${STAGEHAND_BIN_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/stagehand/target}/release}"
NBD="$BIN/stagehand-nbd"
RUNTIME="${RUNTIME:-5}"
ROUNDS="${ROUNDS:-3}"
for t in fio nbdkit qemu-nbd nbdcopy python3; do
  command -v "$t" >/dev/null || { echo "bench: $t missing; run 'make deps'" >&2; exit 1; }
done
[ -x "$NBD" ] || { echo "bench: $NBD not built; run 'make bench'" >&2; exit 1; }

SHM="${BENCH_DIR:-/dev/shm}"
WORK="$(mktemp -d -p "$SHM" stagehand-bench.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

IMG="$WORK/img.raw"
echo "bench: 1 GiB image of random data on $SHM (allocated: no holes to skip)"
head -c 1G /dev/urandom >"$IMG"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 200); do
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "bench: nothing listening on port $1" >&2
  exit 1
}

P_SH="$(port)"; "$NBD" --listen "127.0.0.1:$P_SH" --export "img=$IMG,unleased" >/dev/null 2>"$WORK/stagehand.log" & PIDS+=($!)
P_KIT="$(port)"; nbdkit -f -i 127.0.0.1 -p "$P_KIT" --exportname img file "$IMG" & PIDS+=($!)
P_QEMU="$(port)"; qemu-nbd -f raw -x img -b 127.0.0.1 -p "$P_QEMU" --persistent --shared=0 "$IMG" & PIDS+=($!)
wait_port "$P_SH"; wait_port "$P_KIT"; wait_port "$P_QEMU"
declare -A URI=(
  [stagehand]="nbd://127.0.0.1:$P_SH/img"
  [nbdkit]="nbd://127.0.0.1:$P_KIT/img"
  [qemu-nbd]="nbd://127.0.0.1:$P_QEMU/img"
)
SERVERS=(stagehand nbdkit qemu-nbd)

fio_run() { # uri rw bs qd -> "MiB/s IOPS p99us"
  fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" \
    --size=1G --time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json 2>/dev/null \
    | python3 benches/fio_summary.py
}

declare -A RES
WORKLOADS=("read 1M 8" "write 1M 8" "randread 4k 32" "randwrite 4k 32")
for round in $(seq "$ROUNDS"); do
  # Rotate the order so that no server always runs first (or right after another).
  order=("${SERVERS[@]:$(( (round - 1) % 3 ))}" "${SERVERS[@]:0:$(( (round - 1) % 3 ))}")
  echo "bench: round $round of $ROUNDS (${order[*]})"
  for w in "${WORKLOADS[@]}"; do
    set -- $w
    for s in "${order[@]}"; do
      RES["$w|$s"]+="$(fio_run "${URI[$s]}" "$1" "$2" "$3");"
    done
  done
  for s in "${order[@]}"; do
    # Three copies back to back: one copy of 1 GiB takes about 0.3 s here.
    start=$(date +%s.%N)
    for _ in 1 2 3; do nbdcopy -C 4 "${URI[$s]}" null:; done
    end=$(date +%s.%N)
    RES["nbdcopy|$s"]+="$(python3 -c "print('%.0f 0 0' % (3 * 1024/($end-$start)))");"
  done
done

python3 - "$RUNTIME" "$ROUNDS" <<PY
import statistics, sys
res = {}
# Each entry: "MiBps IOPS p99;" per round; keep the median of each column.
$(for k in "${!RES[@]}"; do echo "res['$k'] = [statistics.median(float(r.split()[i]) for r in '${RES[$k]}'.split(';') if r.strip()) for i in range(3)]"; done)
servers = ["stagehand", "nbdkit", "qemu-nbd"]
rows = [("read 1M 8", "seq read 1M QD8", 0), ("write 1M 8", "seq write 1M QD8", 0),
        ("randread 4k 32", "rand read 4k QD32", 1), ("randwrite 4k 32", "rand write 4k QD32", 1),
        ("nbdcopy", "nbdcopy -C4 to null:", 0)]
print()
print("medians of %s rounds" % sys.argv[2])
print("%-22s %16s %16s %16s %8s %10s" % ("workload (%ss each)" % sys.argv[1], *servers, "ratio", "vs nbdkit"))
for key, label, col in rows:
    vals = {s: float(res[key + "|" + s][col]) for s in servers}
    unit = "IOPS" if col else "MiB/s"
    best = max(vals["nbdkit"], vals["qemu-nbd"])
    print("%-22s %16s %16s %16s %7.2fx %9.2fx" % (label, *["%.0f %s" % (vals[s], unit) for s in servers],
          vals["stagehand"] / best if best else 0, vals["stagehand"] / vals["nbdkit"] if vals["nbdkit"] else 0))
print()
print("%-22s %16s %16s %16s" % ("p99 latency (us)", *servers))
for key, label, col in rows[:4]:
    print("%-22s %16s %16s %16s" % (label, *["%.0f" % res[key + "|" + s][2] for s in servers]))
PY
