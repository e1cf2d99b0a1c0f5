#!/usr/bin/env python3
"""Reads fio --output-format=json on stdin; prints 'MiBps IOPS p99_us client_cpu%' for
the job (client_cpu: fio's user + system time over its run, 100 = one core)."""
import json
import sys

text = sys.stdin.read()
# fio's nbd engine prints a line before the JSON document.
job = json.loads(text[text.index("{"):])["jobs"][0]
for kind in ("read", "write"):
    d = job[kind]
    if d["io_bytes"] > 0:
        p99 = d["clat_ns"]["percentile"].get("99.000000", 0) / 1000
        cpu = job["usr_cpu"] + job["sys_cpu"]
        print("%.0f %.0f %.0f %.0f" % (d["bw"] / 1024, d["iops"], p99, cpu))
        break
