#!/usr/bin/env python3
"""A real-client stale writer for the lease tests (python3-libnbd).

Usage: nbd_writer.py HOST PORT EXPORT SECONDS CONNS BASE_OFFSET

Opens CONNS connections to EXPORT (which may carry ";lease=TOKEN"), prints "ready",
then writes 4 KiB blocks round-robin for SECONDS, one line per attempt:
  ok  START_NS
  err START_NS REASON
START_NS is CLOCK_MONOTONIC (the same clock as Rust's Instant) taken just before the
request was sent. A refused open prints "refused REASON" and exits 3.
"""
import os
import struct
import sys
import time

import nbd

host, port, export, seconds, conns, base = sys.argv[1:7]
seconds = float(seconds)
conns = int(conns)
base = int(base)

handles = []
try:
    for _ in range(conns):
        h = nbd.NBD()
        h.set_export_name(export)
        h.connect_tcp(host, port)
        handles.append(h)
except nbd.Error as e:
    print(f"refused {e.string}", flush=True)
    sys.exit(3)

print("ready", flush=True)
deadline = time.monotonic() + seconds
i = 0
while time.monotonic() < deadline:
    h = handles[i % conns]
    off = base + (i % 256) * 4096
    # Every attempt writes different bytes, so any write that lands changes the file.
    block = struct.pack("<QQ", os.getpid(), i) * 256
    start = time.monotonic_ns()
    try:
        h.pwrite(block, off)
        print(f"ok {start}", flush=True)
    except nbd.Error as e:
        print(f"err {start} {e.string}", flush=True)
        # A closed connection fails at once; do not flood the pipe.
        time.sleep(0.002)
    i += 1
print("done", flush=True)
