#!/usr/bin/env bash
# stagehand-nbd against nbdkit (file plugin) and qemu-nbd, over the same 1 GiB image
# on tmpfs, with the same fio nbd-engine workloads and nbdcopy to null:, in ROUNDS
# interleaved rounds (the servers' order rotates each round); prints the median of
# each figure and stagehand's ratio to the best peer (>1 is better). Single runs
# on this 2-core VM swing by +-20 %, which medians over rounds damp.
#
# It also prints what each side's CPU cost: the client's (fio's own user + system
# time; near 100 % means the client, not the server, sets the pace) and the
# server's CPU time per operation (per MiB for 1 MiB workloads), read from
# /proc/PID/stat around each run. Client and server share the machine's cores, so
# throughput alone hides how much work a server needs per request.
#
# TLS rows: stagehand-nbd with --tls-* against nbdkit --tls=require
# --tls-verify-peer, with the same certificates (a CA and one node certificate from
# the `test-pki` helper, used by both servers and by the clients), fio and nbdcopy
# through nbds:// URIs. fio's nbd engine refuses `?tls-certificates=DIR` in a URI
# (libnbd's "local file access"), so the clients find the certificates where libnbd
# looks by default when run as root: /etc/pki/libnbd, linked to them for the run
# (only if it does not exist; removed at exit).
#
#   ROUNDS=3 RUNTIME=5 bash benches/nbd-peers.sh   (seconds per fio workload)
#   BENCH_SET=plain|tls|all (default all) picks the rows.
#   BENCH_BITMAP=1 adds "stagehand-bitmap": stagehand-nbd on the same image with one
#   dirty bitmap on the export (its activity log's fdatasyncs are what it measures),
#   compared with plain stagehand. BITMAP_DATA_DIR (default: in the bench's tmpfs
#   directory, where fdatasync is almost free) puts its --data-dir on a real disk;
#   BITMAP_AL_REGIONS sets --bitmap-al-regions (4 MiB each; the image is 1 GiB =
#   256 regions, the node's default AL size).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${STAGEHAND_BIN_DIR:-${CARGO_TARGET_DIR:-$HOME/.cache/stagehand/target}/release}"
NBD="$BIN/stagehand-nbd"
RUNTIME="${RUNTIME:-5}"
ROUNDS="${ROUNDS:-3}"
BENCH_SET="${BENCH_SET:-all}"
BENCH_BITMAP="${BENCH_BITMAP:-0}"
for t in fio nbdkit qemu-nbd nbdcopy python3 curl; do
  command -v "$t" >/dev/null || { echo "bench: $t missing; run 'make deps'" >&2; exit 1; }
done
[ -x "$NBD" ] || { echo "bench: $NBD not built; run 'make bench'" >&2; exit 1; }
if [ "$BENCH_SET" != plain ]; then
  [ -x "$BIN/test-pki" ] || { echo "bench: $BIN/test-pki not built; run 'make bench'" >&2; exit 1; }
fi

SHM="${BENCH_DIR:-/dev/shm}"
WORK="$(mktemp -d -p "$SHM" stagehand-bench.XXXXXX)"
PIDS=()
LIBNBD_PKI=""
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -n "$LIBNBD_PKI" ] && rm -f "$LIBNBD_PKI"
  [ -n "${BM_CLEAN:-}" ] && rm -rf "$BM_CLEAN"
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

declare -A PID URI
SERVERS=()
# stagehand-nbd refuses to start without an API token (it serves no API here).
python3 -c 'import secrets; print(secrets.token_hex(32))' >"$WORK/api-token"
if [ "$BENCH_SET" != tls ]; then
  P_SH="$(port)"; "$NBD" --listen "127.0.0.1:$P_SH" --export "img=$IMG,unleased" --api-token-file "$WORK/api-token" >/dev/null 2>"$WORK/stagehand.log" & PIDS+=($!); PID[stagehand]=$!
  P_KIT="$(port)"; nbdkit -f -i 127.0.0.1 -p "$P_KIT" --exportname img file "$IMG" & PIDS+=($!); PID[nbdkit]=$!
  P_QEMU="$(port)"; qemu-nbd -f raw -x img -b 127.0.0.1 -p "$P_QEMU" --persistent --shared=0 "$IMG" & PIDS+=($!); PID[qemu-nbd]=$!
  wait_port "$P_SH"; wait_port "$P_KIT"; wait_port "$P_QEMU"
  URI[stagehand]="nbd://127.0.0.1:$P_SH/img"
  URI[nbdkit]="nbd://127.0.0.1:$P_KIT/img"
  URI[qemu-nbd]="nbd://127.0.0.1:$P_QEMU/img"
  SERVERS+=(stagehand nbdkit qemu-nbd)
  if [ "$BENCH_BITMAP" = 1 ]; then
    BM_DATA="${BITMAP_DATA_DIR:-$WORK/bitmap-data}"
    [ -n "${BITMAP_DATA_DIR:-}" ] && BM_DATA="$(mktemp -d -p "$BITMAP_DATA_DIR" stagehand-bench-data.XXXXXX)" && BM_CLEAN="$BM_DATA"
    P_SHB="$(port)"; P_SHB_API="$(port)"
    "$NBD" --listen "127.0.0.1:$P_SHB" --export "img=$IMG,unleased" --api-token-file "$WORK/api-token" \
      --api "127.0.0.1:$P_SHB_API" --data-dir "$BM_DATA" ${BITMAP_AL_REGIONS:+--bitmap-al-regions "$BITMAP_AL_REGIONS"} \
      >/dev/null 2>"$WORK/stagehand-bitmap.log" & PIDS+=($!); PID[stagehand-bitmap]=$!
    wait_port "$P_SHB"; wait_port "$P_SHB_API"
    curl -sf -X PUT -H "Authorization: Bearer $(cat "$WORK/api-token")" \
      "http://127.0.0.1:$P_SHB_API/v1/exports/img/bitmaps/bench" -d '{}' >/dev/null
    URI[stagehand-bitmap]="nbd://127.0.0.1:$P_SHB/img"
    SERVERS+=(stagehand-bitmap)
    echo "bench: stagehand-bitmap: one dirty bitmap, data dir $BM_DATA, AL ${BITMAP_AL_REGIONS:-default} regions"
  fi
fi
if [ "$BENCH_SET" != plain ]; then
  # One CA and one node certificate (valid for 127.0.0.1, server and client auth),
  # in the directory layout all three tools read.
  "$BIN/test-pki" "$WORK/pki" node
  CERTS="$WORK/pki/node"
  if [ "$(id -u)" != 0 ] || [ -e /etc/pki/libnbd ]; then
    echo "bench: TLS rows need root and no /etc/pki/libnbd (libnbd's default certificate directory, linked to the test certificates for the run); use BENCH_SET=plain" >&2
    exit 1
  fi
  mkdir -p /etc/pki && ln -s "$CERTS" /etc/pki/libnbd && LIBNBD_PKI=/etc/pki/libnbd
  P_SHT="$(port)"; "$NBD" --listen "127.0.0.1:$P_SHT" --export "img=$IMG,unleased" --api-token-file "$WORK/api-token" \
    --tls-cert "$CERTS/server-cert.pem" --tls-key "$CERTS/server-key.pem" --tls-ca "$CERTS/ca-cert.pem" \
    >/dev/null 2>"$WORK/stagehand-tls.log" & PIDS+=($!); PID[stagehand-tls]=$!
  P_KITT="$(port)"; nbdkit -f -i 127.0.0.1 -p "$P_KITT" --exportname img --tls=require \
    --tls-certificates="$CERTS" --tls-verify-peer file "$IMG" & PIDS+=($!); PID[nbdkit-tls]=$!
  wait_port "$P_SHT"; wait_port "$P_KITT"
  URI[stagehand-tls]="nbds://127.0.0.1:$P_SHT/img"
  URI[nbdkit-tls]="nbds://127.0.0.1:$P_KITT/img"
  SERVERS+=(stagehand-tls nbdkit-tls)
fi
NS="${#SERVERS[@]}"

# A process's user + system CPU time so far, all threads, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TICK="$(getconf CLK_TCK)"
now() { date +%s.%N; }
# CPU share of one core between two (ticks, time) samples, in percent.
share() { python3 -c "print('%.0f' % (100 * ($2 - $1) / $TICK / ($4 - $3)))"; }

fio_run() { # server rw bs qd -> "MiB/s IOPS p99us client_cpu% server_cpu%"
  local c0 t0 out
  c0="$(cpu_ticks "${PID[$1]}")"; t0="$(now)"
  out="$(fio --name=bench --ioengine=nbd --uri="${URI[$1]}" --rw="$2" --bs="$3" --iodepth="$4" \
    --size=1G --time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json 2>/dev/null \
    | python3 benches/fio_summary.py)"
  echo "$out $(share "$c0" "$(cpu_ticks "${PID[$1]}")" "$t0" "$(now)")"
}

declare -A RES
WORKLOADS=("read 1M 8" "write 1M 8" "randread 4k 32" "randwrite 4k 32")
for round in $(seq "$ROUNDS"); do
  # Rotate the order so that no server always runs first (or right after another).
  order=("${SERVERS[@]:$(( (round - 1) % NS ))}" "${SERVERS[@]:0:$(( (round - 1) % NS ))}")
  echo "bench: round $round of $ROUNDS (${order[*]})"
  for w in "${WORKLOADS[@]}"; do
    set -- $w
    for s in "${order[@]}"; do
      RES["$w|$s"]+="$(fio_run "$s" "$1" "$2" "$3");"
    done
  done
  for s in "${order[@]}"; do
    # Three copies back to back: one copy of 1 GiB takes about 0.3 s here.
    c0="$(cpu_ticks "${PID[$s]}")"
    copy="$(python3 - "${URI[$s]}" <<'PY'
import resource, subprocess, sys, time
start = time.monotonic()
for _ in range(3):
    subprocess.run(["nbdcopy", "-C", "4", sys.argv[1], "null:"], check=True)
wall = time.monotonic() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print("%.0f 0 0 %.0f %.6f %.6f" % (3 * 1024 / wall, 100 * (ru.ru_utime + ru.ru_stime) / wall, time.time() - wall, time.time()))
PY
)"
    read -r mib _ _ ccpu t0 t1 <<<"$copy"
    RES["nbdcopy|$s"]+="$mib 0 0 $ccpu $(share "$c0" "$(cpu_ticks "${PID[$s]}")" "$t0" "$t1");"
  done
done

python3 - "$RUNTIME" "$ROUNDS" "${SERVERS[*]}" <<PY
import statistics, sys
res = {}
# Each entry: "MiBps IOPS p99 client% server%;" per round; keep the median of each
# column, and of each round's server CPU per operation.
def per_op(r, col):
    v = r.split()
    done = float(v[col])
    return 1e6 * float(v[4]) / 100 / done if done else 0
$(for k in "${!RES[@]}"; do echo "rounds = [r for r in '${RES[$k]}'.split(';') if r.strip()]"; echo "res['$k'] = [statistics.median(float(r.split()[i]) for r in rounds) for i in range(5)] + [statistics.median(per_op(r, 1 if '4k' in '$k' else 0) for r in rounds)]"; done)
present = sys.argv[3].split()
rows = [("read 1M 8", "seq read 1M QD8", 0), ("write 1M 8", "seq write 1M QD8", 0),
        ("randread 4k 32", "rand read 4k QD32", 1), ("randwrite 4k 32", "rand write 4k QD32", 1),
        ("nbdcopy", "nbdcopy -C4 to null:", 0)]

def table(title, ours, kit, peers):
    servers = [ours] + peers
    w = "%16s" * len(servers)
    print()
    print("== %s: medians of %s rounds" % (title, sys.argv[2]))
    print(("%-22s " + w + " %8s %10s") % ("workload (%ss each)" % sys.argv[1], *servers, "ratio", "vs " + kit))
    for key, label, col in rows:
        vals = {s: float(res[key + "|" + s][col]) for s in servers}
        unit = "IOPS" if col else "MiB/s"
        best = max(vals[p] for p in peers)
        print(("%-22s " + w + " %7.2fx %9.2fx") % (label, *["%.0f %s" % (vals[s], unit) for s in servers],
              vals[ours] / best if best else 0, vals[ours] / vals[kit] if vals[kit] else 0))
    print()
    print(("%-22s " + w) % ("p99 latency (us)", *servers))
    for key, label, col in rows[:4]:
        print(("%-22s " + w) % (label, *["%.0f" % res[key + "|" + s][2] for s in servers]))
    print()
    # fio runs one thread: at its per-op cost with our server, a whole core would give
    # this ratio to nbdkit's figure; no server can push a single-threaded client past it.
    print("client CPU (%% of a core; about 100 = the client sets the pace)   %s" % "ceiling vs " + kit)
    for key, label, col in rows:
        cpu = {s: res[key + "|" + s][3] for s in servers}
        ceiling = ""
        if key != "nbdcopy" and cpu[ours] > 0 and res[key + "|" + kit][col] > 0:
            ceiling = "%.2fx" % (res[key + "|" + ours][col] * 100 / cpu[ours] / res[key + "|" + kit][col])
        print(("%-22s " + w + " %10s") % (label, *["%.0f %%" % cpu[s] for s in servers], ceiling))
    print()
    print("server CPU per op (us per 4k op, us per MiB)    %8s %10s" % ("ratio", "vs " + kit))
    for key, label, col in rows:
        vals = {s: res[key + "|" + s][5] for s in servers}
        best = min(vals[p] for p in peers)
        print(("%-22s " + w + " %7.2fx %9.2fx") % (label, *["%.1f" % vals[s] for s in servers],
              best / vals[ours] if vals[ours] else 0,
              vals[kit] / vals[ours] if vals[ours] else 0))

if "stagehand" in present:
    table("plain NBD", "stagehand", "nbdkit", ["nbdkit", "qemu-nbd"])
if "stagehand-bitmap" in present:
    table("stagehand with one dirty bitmap vs without", "stagehand-bitmap", "stagehand", ["stagehand"])
if "stagehand-tls" in present:
    table("NBD over TLS (nbds://, client certificates verified)", "stagehand-tls", "nbdkit-tls", ["nbdkit-tls"])
PY
