#!/usr/bin/env python3
"""`coord migrate` measured: the coordinated switchover's cost over the agents' own.

Starts on loopback a stagehand-nbd storage node, two agents (siteA, siteB) and the
coordinator; creates vm7 (the disk-writer guest, 128 MiB, a leased disk) and moves
it back and forth RUNS times (BENCH_COORD_RUNS, default 6) with `coord migrate
--wait --json`. Prints per run and as medians: the agent's total time and downtime,
the fence time and its share of the downtime, the coordinator's handover (quiesced
seen -> go-ahead sent), the agent's pause -> go-ahead wait, and the coordinator's
overhead on the total (its wall time from `planned` to `committed` minus the agent's
total). Called by benches/migrate-peers.sh (make bench-migrate).
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.environ["STAGEHAND_BIN_DIR"]
TOKEN = "bench-coord-token"
RUNS = int(os.environ.get("BENCH_COORD_RUNS", "6"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url, proc, what):
    for _ in range(300):
        if proc.poll() is not None:
            sys.exit(f"{what} exited during start-up")
        try:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(req, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not come up at {url}")


def main():
    procs = []
    with tempfile.TemporaryDirectory(prefix="bench-coord-") as d:
        env = dict(os.environ, STAGEHAND_TOKEN=TOKEN)
        log = open(os.path.join(d, "daemons.log"), "w")

        def start(args, url, what):
            p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
            procs.append(p)
            wait_up(url, p, what)

        try:
            nbd, nbd_api = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            os.makedirs(f"{d}/nbd-data")
            os.makedirs(f"{d}/disks")
            start([f"{BIN}/stagehand-nbd", "--listen", nbd, "--api", nbd_api, "--data-dir",
                   f"{d}/nbd-data", "--export-root", f"{d}/disks", "--api-token", TOKEN], f"http://{nbd_api}/v1/health", "stagehand-nbd")
            agents = {}
            for host in ("kvm-a1", "kvm-b1"):
                api, mig = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
                os.makedirs(f"{d}/{host}")
                start([f"{BIN}/stagehand-agent", "--api", api, "--migration-listen", mig, "--host-id", host,
                       "--data-dir", f"{d}/{host}", "--api-token", TOKEN], f"http://{api}/v1/health", host)
                agents[host] = (api, mig)
            capi = f"127.0.0.1:{free_port()}"
            start([f"{BIN}/coord", "serve", "--api", capi, "--data-dir", f"{d}/coord", "--api-token", TOKEN],
                  f"http://{capi}/v1/health", "coord serve")
            env["STAGEHAND_COORDINATOR"] = f"http://{capi}"

            def coord(*args):
                out = subprocess.run([f"{BIN}/coord", *args, "--json"], env=env, capture_output=True,
                                     text=True, timeout=300)
                if out.returncode != 0:
                    sys.exit(f"coord {' '.join(args)}: {out.stderr.strip()}")
                return json.loads(out.stdout) if out.stdout.strip() else None

            coord("site", "add", "siteA")
            coord("site", "add", "siteB")
            coord("storage", "add", "nbd-a1", "--site", "siteA", "--api", f"http://{nbd_api}", "--nbd", nbd,
                  "--reachable-from", "siteB", "--disk-dir", f"{d}/disks")
            for host, site in (("kvm-a1", "siteA"), ("kvm-b1", "siteB")):
                coord("host", "add", host, "--site", site, "--api", f"http://{agents[host][0]}",
                      "--migration", agents[host][1], "--memory", "1G")
            # Into the first host's images directory: agents boot only from there.
            guest = f"{d}/kvm-a1/images/disk-writer.bin"
            subprocess.run([f"{BIN}/stagehand-agent", "--data-dir", f"{d}/kvm-a1", "guest-image",
                            "disk-writer"], check=True, capture_output=True)
            coord("vm", "create", "vm7", "--site", "siteA", "--memory", "128M", "--image", guest,
                  "--disk", "64M")
            time.sleep(1)
            rows = []
            for i in range(RUNS):
                site = "siteB" if i % 2 == 0 else "siteA"
                m = coord("migrate", "vm7", "--to", site, "--wait", "--wait-timeout-s", "120")
                if m["state"] != "committed":
                    sys.exit(f"run {i}: {m['state']}: {m.get('error')}")
                wall = m["finished_ms"] - m["created_ms"]
                down = max(m["downtime_ms"], 1)
                rows.append({
                    "total": m["total_ms"], "down": m["downtime_ms"], "fence": m["fence_us"] / 1000,
                    "share": 100 * m["fence_us"] / 1000 / down, "handover": m["handover_ms"],
                    "wait": m["switchover_wait_ms"], "wall": wall, "overhead": wall - m["total_ms"],
                })
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
    cols = [("total", "agent total ms"), ("down", "downtime ms"), ("fence", "fence ms"),
            ("share", "fence % of downtime"), ("handover", "handover ms"), ("wait", "pause->go-ahead ms"),
            ("wall", "coord wall ms"), ("overhead", "coord overhead ms")]
    print("\ncoord migrate (coordinated switchover, disk-writer guest 128 MiB, loopback):")
    print("run  " + "  ".join(f"{h:>19}" for _, h in cols))
    for i, r in enumerate(rows):
        print(f"{i:>3}  " + "  ".join(f"{r[k]:>19.2f}" for k, _ in cols))
    print("med  " + "  ".join(f"{statistics.median(r[k] for r in rows):>19.2f}" for k, _ in cols))


if __name__ == "__main__":
    main()
