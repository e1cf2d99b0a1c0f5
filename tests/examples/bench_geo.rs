//! `make bench-geo`, first part: mirror throughput over a shaped link between two
//! sites (network namespaces, `tc tbf`, a userspace delay line: see
//! `stagehand_tests::netns`), as a share of the link, with nbdcopy between two
//! qemu-nbd over the same link as the peer, in the same run.
//!
//! A 1 GiB disk holding 256 MiB of random data (1 MiB every 4 MiB). Per round:
//! nbdcopy from a qemu-nbd in site A to a qemu-nbd in site B, then a stagehand-nbd
//! mirror job from site A to a stagehand-nbd in site B (time from POST to `synced`,
//! which includes connecting and the first look at the target), each to a fresh
//! sparse target. Needs root.
//!
//! ```text
//! RATE_MBIT=1000 RTT_MS=20 ROUNDS=3 bench_geo
//! ```

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use stagehand_tests::netns::{LinkSpec, TwoSites};
use stagehand_tests::{NBD_API_TOKEN, free_port, pattern, sparse_file, start_nbd, start_nbd_in};

const MIB: u64 = 1 << 20;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A child killed on drop.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(addr: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{addr} never listened");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// qemu-nbd serving `img` as `name` on `addr`, under `wrapper` (a netns exec).
fn qemu_nbd(wrapper: &[&str], img: &Path, name: &str, addr: &str, ro: bool) -> Result<Proc> {
    let (host, port) = addr.rsplit_once(':').context("addr")?;
    let mut c = match wrapper.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg("qemu-nbd");
            c
        }
        None => Command::new("qemu-nbd"),
    };
    c.args(["-f", "raw", "-x", name, "-b", host, "-p", port])
        .args(["--persistent", "--shared=8", "--cache=writeback"]);
    if ro {
        c.arg("-r");
    }
    let child = c
        .arg(img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn qemu-nbd")?;
    Ok(Proc(child))
}

struct Api {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        self.rt.block_on(async {
            let m = reqwest::Method::from_bytes(method.as_bytes())?;
            let mut r = self
                .http
                .request(m, format!("{}{path}", self.base))
                .bearer_auth(NBD_API_TOKEN);
            if let Some(b) = body {
                r = r.json(&b);
            }
            let resp = r.send().await?;
            let status = resp.status();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                bail!("{method} {path}: {status} {v}");
            }
            Ok(v)
        })
    }
}

fn main() -> Result<()> {
    if !TwoSites::available("bench-geo") {
        return Ok(());
    }
    for tool in ["qemu-nbd", "nbdcopy"] {
        if !stagehand_tests::have_tool(tool) {
            bail!("{tool} missing (run `make deps`)");
        }
    }
    let link = LinkSpec {
        rate_mbit: env("RATE_MBIT", 1000),
        rtt: Duration::from_millis(env("RTT_MS", 20)),
    };
    let rounds = env("ROUNDS", 3);
    let dir = tempfile::tempdir()?;
    let size = 1 << 30;
    let data = 256;
    let src = dir.path().join("src.img");
    sparse_file(&src, size);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&src)?;
        for i in 0..data {
            f.write_all_at(&pattern(MIB as usize, 100 + i), i * 4 * MIB)?;
        }
        f.sync_all()?;
    }
    let mut sites = TwoSites::create(link)?;
    sites.enter_a()?;
    let in_b = ["ip", "netns", "exec", sites.b.as_str()];
    let ideal = (data * MIB) as f64 / link.bytes_per_s();
    println!(
        "bench-geo: {} Mbit/s, {:?} RTT, 1 GiB disk with {data} MiB of random data ({ideal:.2} s at line rate), {rounds} rounds",
        link.rate_mbit, link.rtt
    );

    // Site A: qemu-nbd (nbdcopy's source) and stagehand-nbd (the mirror's), both on
    // the same image, read-only for qemu-nbd.
    let qa = format!("127.0.0.1:{}", free_port());
    let _qsrc = qemu_nbd(&[], &src, "src", &qa, true)?;
    wait_port(&qa)?;
    let api_port = free_port();
    let api_addr = format!("127.0.0.1:{api_port}");
    let _source = start_nbd(&[
        "--mirror-allow",
        "127.0.0.0/8",
        "--api",
        &api_addr,
        "--export",
        &format!("src={},unleased", src.display()),
    ]);
    let api = Api {
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        http: reqwest::Client::new(),
        base: format!("http://{api_addr}"),
    };

    let mut copy_rates = Vec::new();
    let mut mirror_rates = Vec::new();
    for round in 1..=rounds {
        // nbdcopy between two qemu-nbd.
        let dq = dir.path().join(format!("q{round}.img"));
        sparse_file(&dq, size);
        let qb = format!("{}:{}", sites.b_ip, free_port());
        let _qdst = qemu_nbd(&in_b, &dq, "dst", &qb, false)?;
        wait_port(&qb)?;
        let relay = sites.relay(qb.parse()?)?;
        let t = Instant::now();
        let out = Command::new("nbdcopy")
            .arg(format!("nbd://{qa}/src"))
            .arg(format!("nbd://{}/dst", relay.addr))
            .output()?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("nbdcopy: {}", String::from_utf8_lossy(&out.stderr));
        }
        let copy = (data * MIB) as f64 / secs;
        copy_rates.push(copy);
        drop(relay);

        // Our mirror job between two stagehand-nbd.
        let ds = dir.path().join(format!("s{round}.img"));
        sparse_file(&ds, size);
        let sb = format!("{}:{}", sites.b_ip, free_port());
        let _target = start_nbd_in(
            &in_b,
            &[
                "--listen",
                &sb,
                "--export",
                &format!("dst={},unleased", ds.display()),
            ],
        );
        let relay = sites.relay(sb.parse()?)?;
        let t = Instant::now();
        let v = api.call(
            "POST",
            "/v1/mirrors",
            Some(json!({"export": "src", "target": {"address": relay.addr.to_string(), "export": "dst"}})),
        )?;
        let id = v["id"].as_str().context("id")?.to_string();
        let v = loop {
            let v = api.call("GET", &format!("/v1/mirrors/{id}"), None)?;
            if v["state"] == "synced" {
                break v;
            }
            if v["state"] == "failed" {
                bail!("mirror failed: {v}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let secs_m = t.elapsed().as_secs_f64();
        api.call("POST", &format!("/v1/mirrors/{id}/complete"), None)?;
        let copied = v["bytes_copied"].as_u64().unwrap_or(0);
        let mirror = copied as f64 / secs_m;
        mirror_rates.push(mirror);
        println!(
            "round {round}: nbdcopy {secs:.2} s {:.1} MiB/s ({:.0} % of the link); mirror {secs_m:.2} s {:.1} MiB/s ({:.0} %), {} MiB copied",
            copy / MIB as f64,
            100.0 * copy / link.bytes_per_s(),
            mirror / MIB as f64,
            100.0 * mirror / link.bytes_per_s(),
            copied / MIB
        );
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (c, m) = (med(&mut copy_rates), med(&mut mirror_rates));
    println!(
        "bench-geo: median mirror {:.1} MiB/s = {:.0} % of the link; nbdcopy {:.1} MiB/s = {:.0} %; mirror / nbdcopy = {:.2}x",
        m / MIB as f64,
        100.0 * m / link.bytes_per_s(),
        c / MIB as f64,
        100.0 * c / link.bytes_per_s(),
        m / c
    );
    Ok(())
}
