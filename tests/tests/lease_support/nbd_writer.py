#!/usr/bin/env python3
"""A real-client stale writer for the lease tests (python3-libnbd).

Usage: nbd_writer.py HOST PORT EXPORT SECONDS CONNS BASE_OFFSET [QUEUE_DEPTH]

Opens CONNS connections to EXPORT (which may carry ";lease=TOKEN"), prints "ready",
then writes 4 KiB blocks for SECONDS, one line per attempt:
  ok  START_NS
  err START_NS REASON
START_NS is CLOCK_MONOTONIC (the same clock as Rust's Instant) taken just before the
request was sent. With QUEUE_DEPTH > 1 every connection keeps that many writes in
flight (libnbd aio), so the server has requests queued when a fence comes. A refused
open prints "refused REASON" and exits 3.
"""
import os
import struct
import sys
import time

import nbd

host, port, export, seconds, conns, base = sys.argv[1:7]
qd = int(sys.argv[7]) if len(sys.argv) > 7 else 1
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
counter = 0


def block():
    # Every attempt writes different bytes, so any write that lands changes the file.
    global counter
    counter += 1
    off = base + (counter % 256) * 4096
    return struct.pack("<QQ", os.getpid(), counter) * 256, off


if qd <= 1:
    while time.monotonic() < deadline:
        h = handles[counter % conns]
        data, off = block()
        start = time.monotonic_ns()
        try:
            h.pwrite(data, off)
            print(f"ok {start}", flush=True)
        except nbd.Error as e:
            print(f"err {start} {e.string}", flush=True)
            # A closed connection fails at once; do not flood the pipe.
            time.sleep(0.002)
else:
    inflight = [[] for _ in handles]  # per handle: (cookie, start_ns, buffer)
    while time.monotonic() < deadline:
        for i, h in enumerate(handles):
            failed = False
            while len(inflight[i]) < qd:
                data, off = block()
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                start = time.monotonic_ns()
                try:
                    cookie = h.aio_pwrite(buf, off)
                    inflight[i].append((cookie, start, buf))
                except nbd.Error as e:
                    print(f"err {start} {e.string}", flush=True)
                    failed = True
                    break
            if failed:
                time.sleep(0.002)
            if inflight[i]:
                try:
                    h.poll(10)
                except nbd.Error:
                    pass
            still = []
            for cookie, start, buf in inflight[i]:
                try:
                    if h.aio_command_completed(cookie):
                        print(f"ok {start}", flush=True)
                    else:
                        still.append((cookie, start, buf))
                except nbd.Error as e:
                    print(f"err {start} {e.string}", flush=True)
            inflight[i] = still
print("done", flush=True)
