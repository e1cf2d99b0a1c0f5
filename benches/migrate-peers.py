#!/usr/bin/env python3
"""Side-by-side live migration: QEMU 7.2 (QMP `migrate`) against stagehand-agent.

Both run the same A-B sweeper boot sector (QEMU from a 1 MiB disk image through
SeaBIOS, ours as a flat binary at 0x7c00), with the same memory, source and target on
loopback, one run per case, plus a case whose target runs in a network namespace
behind a veth pair shaped to 110 MiB/s with tc (so compression counts on the wire, as
on a real WAN link). BENCH_CASES=substring,... picks cases; BENCH_ROUNDS=N runs our variants N times interleaved (medians). Prints a table with total time and downtime and our
ratios to QEMU. Each case also runs our agents with --tls-* ("stagehand TLS": every
stream TLS with client certificates; BENCH_TLS=0 leaves it out). Called by benches/migrate-peers.sh (make bench-migrate).
"""

import contextlib
import json
import os
import shutil
import statistics
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

QEMU_ROOT = os.environ.get("QEMU_ROOT", os.path.expanduser("~/.cache/stagehand/qemu/root"))
BIN_DIR = os.environ["STAGEHAND_BIN_DIR"]
AGENT = os.path.join(BIN_DIR, "stagehand-agent")
TOKEN = "bench-token"
CONVERGE_TIMEOUT_S = float(os.environ.get("BENCH_CONVERGE_TIMEOUT_S", "60"))
MIB = 1 << 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout, what):
    t = time.time()
    while time.time() - t < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class ShapedLink:
    """A veth pair into a network namespace, shaped with tc (tbf) in both directions.

    The migration target runs inside the namespace, so every byte of the stream crosses
    a real 110 MiB/s bottleneck: compression and delta encoding count on both sides,
    unlike an application-level bandwidth cap, which limits bytes before compression.
    """

    NS = "shb-target"
    HOST_IF, NS_IF = "shb0", "shb1"
    HOST_IP, NS_IP = "10.77.0.1", "10.77.0.2"

    def __init__(self, mibs):
        self.mibs = mibs

    def _ip(self, *args, ns=False, check=True):
        cmd = (["ip", "netns", "exec", self.NS] if ns else []) + list(args)
        return subprocess.run(cmd, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self):
        self.__exit__()
        rate = f"{self.mibs * 8 * 1024 * 1024 // 1000}kbit"
        self._ip("ip", "netns", "add", self.NS)
        self._ip("ip", "link", "add", self.HOST_IF, "type", "veth", "peer", "name", self.NS_IF)
        self._ip("ip", "link", "set", self.NS_IF, "netns", self.NS)
        self._ip("ip", "addr", "add", f"{self.HOST_IP}/24", "dev", self.HOST_IF)
        self._ip("ip", "link", "set", self.HOST_IF, "up")
        self._ip("ip", "addr", "add", f"{self.NS_IP}/24", "dev", self.NS_IF, ns=True)
        self._ip("ip", "link", "set", self.NS_IF, "up", ns=True)
        self._ip("ip", "link", "set", "lo", "up", ns=True)
        for dev, ns in ((self.HOST_IF, False), (self.NS_IF, True)):
            self._ip("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                     "burst", "512kb", "latency", "20ms", ns=ns)
        return self

    def __exit__(self, *exc):
        self._ip("ip", "link", "del", self.HOST_IF, check=False)
        self._ip("ip", "netns", "del", self.NS, check=False)

    def prefix(self):
        return ["ip", "netns", "exec", self.NS]

    @staticmethod
    def available():
        if os.geteuid() != 0 or shutil.which("tc") is None or shutil.which("ip") is None:
            return False
        return True


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


# ---------------------------------------------------------------- QEMU -----------

class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        wait_for(lambda: self._try(path), 20, f"QMP socket {path}")
        self.f = self.s.makefile("rwb")
        self._recv()  # greeting
        self.cmd("qmp_capabilities")

    def _try(self, path):
        try:
            self.s.connect(path)
            return True
        except OSError:
            return False

    def _recv(self):
        while True:
            line = self.f.readline()
            if not line:
                raise EOFError("QMP closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        r = self._recv()
        if "error" in r:
            raise RuntimeError(f"QMP {name}: {r['error']}")
        return r.get("return")


def qemu(mem_mib, image, workdir, tag, incoming_port=None, link=None):
    qmp = os.path.join(workdir, f"{tag}.qmp")
    serial = os.path.join(workdir, f"{tag}.serial")
    args = [
        os.path.join(QEMU_ROOT, "usr/bin/qemu-system-x86_64"),
        "-L", os.path.join(QEMU_ROOT, "usr/share/qemu"),
        "-L", os.path.join(QEMU_ROOT, "usr/share/seabios"),
        "-L", os.path.join(QEMU_ROOT, "usr/lib/ipxe/qemu"),
        "-enable-kvm", "-m", f"{mem_mib}M", "-smp", "1",
        "-nodefaults", "-display", "none", "-vga", "none", "-net", "none",
        "-serial", f"file:{serial}",
        "-drive", f"file={image},format=raw,if=ide,snapshot=on",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]
    if incoming_port:
        host = link.NS_IP if link else "127.0.0.1"
        args += ["-incoming", f"tcp:{host}:{incoming_port}"]
    if link:
        args = link.prefix() + args
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, f"{tag}.err"), "wb"))
    return p, Qmp(qmp), serial


def run_qemu(mem_mib, image, workdir, bandwidth_mibs, caps, link=None):
    port = free_port()
    src, sq, sserial = qemu(mem_mib, image, workdir, "qsrc")
    dst, dq, dserial = qemu(mem_mib, image, workdir, "qdst", incoming_port=port, link=link)
    dst_host = link.NS_IP if link else "127.0.0.1"
    try:
        wait_for(lambda: b"A" in read(sserial), 60, "'A' from the QEMU guest")
        time.sleep(2)
        if caps:
            sq.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
            dq.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
        # "Unlimited": QEMU's default cap is 128 MiB/s, so lift it.
        bw = (bandwidth_mibs or 100 * 1024) * MIB
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": bw})
        sq.cmd("migrate", uri=f"tcp:{dst_host}:{port}")
        t0 = time.time()
        while True:
            info = sq.cmd("query-migrate")
            st = info.get("status")
            if st in ("completed", "failed", "cancelled"):
                break
            if time.time() - t0 > CONVERGE_TIMEOUT_S:
                sq.cmd("migrate_cancel")
                return {"state": f"no convergence in {CONVERGE_TIMEOUT_S:.0f} s", "total_ms": None, "downtime_ms": None}
            time.sleep(0.02)
        if st != "completed":
            return {"state": st, "total_ms": None, "downtime_ms": None}
        # The guest must keep sweeping on the target ('B' comes only every ~30 s here,
        # so look at the memory the sweeper writes instead).
        first = dq.cmd("human-monitor-command", **{"command-line": "xp /1xb 0x100000"})
        wait_for(lambda: dq.cmd("human-monitor-command", **{"command-line": "xp /1xb 0x100000"}) != first,
                 10, "the sweeper to run on the QEMU target")
        return {"state": st, "total_ms": info.get("total-time"), "downtime_ms": info.get("downtime")}
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


# ------------------------------------------------------------- stagehand ---------

# --tls-* files for the "stagehand TLS" variant (made once per run by make_pki).
PKI = {}


def make_pki(workdir):
    """A throwaway CA and one node certificate (valid for loopback and the shaped link's
    target address, server and client auth) that both agents use."""
    d = os.path.join(workdir, "pki")
    os.makedirs(d, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)
    run("req", "-x509", *ec, "-keyout", f"{d}/ca-key.pem", "-out", f"{d}/ca-cert.pem",
        "-days", "2", "-subj", "/CN=bench-ca")
    run("req", *ec, "-keyout", f"{d}/key.pem", "-out", f"{d}/csr.pem", "-subj", "/CN=bench-node")
    with open(f"{d}/ext.cnf", "w") as f:
        f.write(f"subjectAltName=IP:127.0.0.1,IP:{ShapedLink.NS_IP},DNS:localhost\n"
                "extendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", f"{d}/csr.pem", "-CA", f"{d}/ca-cert.pem", "-CAkey", f"{d}/ca-key.pem",
        "-CAcreateserial", "-out", f"{d}/cert.pem", "-days", "2", "-extfile", f"{d}/ext.cnf")
    PKI.update(cert=f"{d}/cert.pem", key=f"{d}/key.pem", ca=f"{d}/ca-cert.pem")


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    ctx = ssl.create_default_context(cafile=PKI["ca"]) if url.startswith("https") else None
    with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
        raw = r.read()
        return json.loads(raw) if raw and r.headers.get("Content-Type", "").startswith("application/json") else raw


def agent(workdir, tag, link=None, tls=False):
    api, mig = free_port(), free_port()
    host = link.NS_IP if link else "127.0.0.1"
    args = [AGENT, "--api", f"{host}:{api}", "--migration-listen", f"{host}:{mig}",
            "--api-token", TOKEN, "--data-dir", os.path.join(workdir, tag)]
    if tls:
        args += ["--tls-cert", PKI["cert"], "--tls-key", PKI["key"], "--tls-ca", PKI["ca"]]
    if link:
        args = link.prefix() + args
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, f"{tag}.log"), "wb"))
    base = f"{'https' if tls else 'http'}://{host}:{api}"
    wait_for(lambda: _health(base), 20, f"agent {tag}")
    return p, base, f"{host}:{mig}"


def _health(base):
    try:
        http("GET", base + "/v1/health")
        return True
    except Exception:
        return False


def run_ours(mem_mib, flat, workdir, bandwidth_mibs, extra, link=None):
    extra = dict(extra)
    tls = extra.pop("tls", False)
    src, sbase, _ = agent(workdir, "asrc", tls=tls)
    dst, dbase, dmig = agent(workdir, "adst", link=link, tls=tls)
    try:
        # The agent boots only from its images directory (<data-dir>/images).
        image = os.path.join(workdir, "asrc", "images", "ab.bin")
        shutil.copyfile(flat, image)
        http("PUT", f"{sbase}/v1/vms/ab", {"memory_mib": mem_mib, "vcpus": 1,
                                            "boot": {"flat_binary": image, "load_addr": 0x7C00}, "disks": []})
        wait_for(lambda: b"A" in http("GET", f"{sbase}/v1/vms/ab/console"), 30, "'A' from our guest")
        time.sleep(2)
        body = {"target": dmig, "timeout_s": int(CONVERGE_TIMEOUT_S)}
        if bandwidth_mibs:
            body["max_bandwidth_mibs"] = bandwidth_mibs
        body.update(extra)
        mid = http("POST", f"{sbase}/v1/vms/ab/migrate", body)["migration_id"]
        info = wait_for(lambda: _final(sbase, mid), CONVERGE_TIMEOUT_S + 30, "our migration")
        if info["state"] != "completed":
            err = (info.get("error") or {}).get("code", "")
            st = f"no convergence in {CONVERGE_TIMEOUT_S:.0f} s" if err == "timeout" else f"{info['state']} {err}"
            return {"state": st, "total_ms": None, "downtime_ms": None, "info": info}
        st = http("GET", f"{dbase}/v1/vms/ab")["state"]
        if st != "running":
            raise RuntimeError(f"our target VM is {st} after the migration")
        return {"state": "completed", "total_ms": info["total_ms"], "downtime_ms": info["downtime_ms"], "info": info}
    finally:
        for p in (src, dst):
            p.send_signal(signal.SIGTERM)
        for p in (src, dst):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def _final(base, mid):
    i = http("GET", f"{base}/v1/migrations/{mid}")
    return i if i["state"] in ("completed", "failed", "cancelled") else None


# ------------------------------------------------------------------ main ---------

def fmt(v):
    return "-" if v is None else f"{v:.1f}"


def run_case(name, mem, bw, link, q_variants, o_variants, image, flat, workdir, results):
    for label, caps in q_variants:
        r = run_qemu(mem, image, workdir, bw, caps, link=link)
        results.append((label, r))
        print(f"{name:20} {label:30} {r['state']:28} total {fmt(r['total_ms']):>8} ms  downtime {fmt(r['downtime_ms']):>7} ms", flush=True)
    # BENCH_ROUNDS=N runs our variants N times, interleaved (one round runs every
    # variant once), and keeps the median of total time and of downtime: single
    # runs on this shared 2-core VM swing by tens of percent, which would hide a
    # 10 % TLS cost or invent one.
    rounds = max(1, int(os.environ.get("BENCH_ROUNDS", "1")))
    runs = {label: [] for label, _ in o_variants}
    for rnd in range(rounds):
        for label, extra in o_variants:
            r = run_ours(mem, flat, workdir, bw, extra, link=link)
            runs[label].append(r)
            tag = f" (round {rnd + 1}/{rounds})" if rounds > 1 else ""
            print(f"{name:20} {label + tag:30} {r['state']:28} total {fmt(r['total_ms']):>8} ms  downtime {fmt(r['downtime_ms']):>7} ms", flush=True)
            if os.environ.get("BENCH_VERBOSE"):
                print(json.dumps(r.get("info"), indent=1))
    for label, _ in o_variants:
        done = [r for r in runs[label] if r["total_ms"] is not None]
        if len(done) < len(runs[label]) or rounds == 1:
            # A run that never converged counts as such (no median hides it).
            results.append((label, next((r for r in runs[label] if r["total_ms"] is None), runs[label][0])))
            continue
        med = {"state": "completed",
               "total_ms": statistics.median(r["total_ms"] for r in done),
               "downtime_ms": statistics.median(r["downtime_ms"] for r in done)}
        results.append((label, med))
        print(f"{name:20} {label + ' (median)':30} {'':28} total {fmt(med['total_ms']):>8} ms  downtime {fmt(med['downtime_ms']):>7} ms", flush=True)


def main():
    flat = sys.argv[1]
    workdir = tempfile.mkdtemp(prefix="bench-migrate-")
    image = os.path.join(workdir, "ab.img")
    with open(flat, "rb") as f:
        sector = f.read()
    with open(image, "wb") as f:  # SeaBIOS will not boot a 512-byte disk.
        f.write(sector.ljust(MIB, b"\0"))

    if os.environ.get("BENCH_TLS", "1") != "0":
        make_pki(workdir)
    # (name, memory MiB, application bandwidth cap MiB/s, tc-shaped link MiB/s)
    cases = [
        ("150 MiB unlimited", 150, None, None),
        ("1 GiB unlimited", 1024, None, None),
        ("1 GiB at 110 MiB/s", 1024, 110, None),
    ]
    if ShapedLink.available():
        cases.append(("1 GiB tc link 110", 1024, None, 110))
    else:
        print("NOTE: the tc-shaped 110 MiB/s case needs root, ip and tc; skipped", file=sys.stderr)
    only = os.environ.get("BENCH_CASES")
    if only:
        cases = [c for c in cases if any(o.strip() in c[0] for o in only.split(","))]
    rows = []
    for name, mem, bw, shaped in cases:
        # BENCH_QEMU=0: our side only (no QEMU needed), e.g. for the TLS/plain figures.
        q_variants = [("QEMU default", [])] if os.environ.get("BENCH_QEMU", "1") != "0" else []
        o_variants = [("stagehand default", {})]
        if PKI:
            # Every migration stream over TLS (client certificates), HTTPS API.
            o_variants.append(("stagehand TLS", {"tls": True}))
        if (bw or shaped) and q_variants:
            q_variants += [("QEMU auto-converge", ["auto-converge"]),
                           ("QEMU xbzrle+auto-converge", ["xbzrle", "auto-converge"])]
            o_variants += [("stagehand auto-converge", {"auto_converge": True}),
                           ("stagehand lz4+auto-converge", {"compression": "lz4", "auto_converge": True})]
        results = []
        with contextlib.ExitStack() as stack:
            link = stack.enter_context(ShapedLink(shaped)) if shaped else None
            run_case(name, mem, bw, link, q_variants, o_variants, image, flat, workdir, results)
        rows.append((name, results))

    print("\nRatios (ours / QEMU; best of each side; lower is better):")
    for name, results in rows:
        q = [r for l, r in results if l.startswith("QEMU") and r["total_ms"] is not None]
        o = [r for l, r in results if l.startswith("stagehand") and r["total_ms"] is not None]
        if not q or not o:
            print(f"  {name}: one side never converged")
            continue
        qt, qd = min(r["total_ms"] for r in q), min(r["downtime_ms"] for r in q)
        ot, od = min(r["total_ms"] for r in o), min(r["downtime_ms"] for r in o)
        print(f"  {name}: total {ot:.0f}/{qt:.0f} ms = {ot / qt:.2f}x, downtime {od:.1f}/{qd:.1f} ms = {od / max(qd, 0.001):.2f}x")
    if PKI:
        print("\nTLS cost (stagehand TLS / stagehand default; target: within 1.10x on the unlimited cases):")
        for name, results in rows:
            d = dict(results)
            p, t = d.get("stagehand default"), d.get("stagehand TLS")
            if not (p and t and p["total_ms"] and t["total_ms"]):
                print(f"  {name}: one side never converged")
                continue
            print(f"  {name}: total {t['total_ms']:.0f}/{p['total_ms']:.0f} ms = {t['total_ms'] / p['total_ms']:.2f}x, "
                  f"downtime {t['downtime_ms']:.1f}/{p['downtime_ms']:.1f} ms = {t['downtime_ms'] / max(p['downtime_ms'], 0.001):.2f}x")
    if os.environ.get("BENCH_KEEP"):
        print(f"kept {workdir} (agent logs: asrc.log, adst.log)")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
