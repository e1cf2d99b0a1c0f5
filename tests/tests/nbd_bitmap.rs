//! Dirty bitmaps of stagehand-nbd against real clients: created over the control API,
//! written by qemu-io, read back by nbdinfo (`--map=qemu:dirty-bitmap:NAME`), by
//! qemu-img (`x-dirty-bitmap`) and by libnbd with base:allocation selected too; then
//! kill -9 of the node right after acknowledged writes: nothing is lost, and far
//! from the whole disk comes back dirty.

// Test helpers panic to report a failure, like the tests that call them.
#![allow(clippy::unwrap_used)]

mod lease_support;

use std::process::Command;
use std::time::Duration;

use lease_support::{Node, have_python_libnbd, python};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use stagehand_tests::{have_tool, run_ok, skip, sparse_file};

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;
const G: u64 = 64 << 10;

/// `[offset, offset+len)` rounded out to `g`, merged with its neighbours.
fn rounded(ranges: &[(u64, u64)], g: u64, size: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges
        .iter()
        .map(|(o, l)| {
            let s = o / g * g;
            let e = ((o + l).div_ceil(g) * g).min(size);
            (s, e)
        })
        .collect();
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

fn extents(v: &Value) -> Vec<(u64, u64)> {
    v["extents"]
        .as_array()
        .unwrap_or_else(|| panic!("no extents in {v}"))
        .iter()
        .map(|e| (e[0].as_u64().unwrap(), e[1].as_u64().unwrap()))
        .collect()
}

/// Merges adjacent `(offset, len)` runs.
fn merged(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in v {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l)),
        }
    }
    out
}

async fn call(node: &Node, m: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let b = body.map(|b| b.to_string());
    node.call(m, path, b.as_deref(), None).await
}

fn qemu_io(addr: &str, export: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(format!("nbd://{addr}/{export}"));
    run_ok(&mut c, T);
}

/// Dirty runs as nbdinfo reports them.
fn nbdinfo_dirty(addr: &str, export: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let out = run_ok(
        Command::new("nbdinfo").args([
            "--json",
            &format!("--map=qemu:dirty-bitmap:{bitmap}"),
            &format!("nbd://{addr}/{export}"),
        ]),
        T,
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    merged(
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"].as_u64().unwrap() & 1 == 1)
            .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect(),
    )
}

/// Dirty runs as qemu-img reports them: with x-dirty-bitmap, qemu maps the bitmap's
/// dirty flag onto "not data".
fn qemu_img_dirty(addr: &str, export: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let (host, port) = addr.split_once(':').unwrap();
    let out = run_ok(
        Command::new("qemu-img").args([
            "map",
            "--output=json",
            "--image-opts",
            &format!(
                "driver=nbd,server.type=inet,server.host={host},server.port={port},export={export},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
            ),
        ]),
        T,
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    merged(
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == false)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect(),
    )
}

/// libnbd with base:allocation and the bitmap selected together: the dirty runs
/// and the number of base:allocation extents in one BLOCK_STATUS reply.
const LIBNBD_BOTH: &str = r#"
import json, sys, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:" + sys.argv[2])
h.connect_uri(sys.argv[1])
assert h.can_meta_context("base:allocation")
assert h.can_meta_context("qemu:dirty-bitmap:" + sys.argv[2])
size = h.get_size()
seen = {}
def cb(ctx, offset, entries, err):
    seen.setdefault(ctx, []).append((offset, list(entries)))
    return 0
pos = 0
while pos < size:
    before = dict((k, len(v)) for k, v in seen.items())
    h.block_status(min(size - pos, 1 << 30), pos, cb)
    ctx = "qemu:dirty-bitmap:" + sys.argv[2]
    off, ents = seen[ctx][-1]
    pos = off + sum(ents[0::2])
dirty = []
for off, ents in seen.get("qemu:dirty-bitmap:" + sys.argv[2], []):
    p = off
    for i in range(0, len(ents), 2):
        if ents[i + 1] & 1:
            dirty.append([p, ents[i]])
        p += ents[i]
print(json.dumps({"dirty": dirty, "base": len(seen.get("base:allocation", []))}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmaps_record_writes_and_standard_clients_read_them() {
    for t in ["qemu-io", "qemu-img", "nbdinfo"] {
        if !have_tool(t) {
            skip!("SKIPPED: {t} missing (make deps)");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, size);
    let node = Node::start(
        &dir.path().join("data"),
        &[
            "--export".into(),
            format!("disk={},unleased", disk.display()),
        ],
        None,
    )
    .await;
    let addr = node.nbd_addr();
    let bm = "/v1/exports/disk/bitmaps";

    // Creation and its errors.
    let (s, v) = call(&node, Method::PUT, &format!("{bm}/b"), None).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["granularity_bytes"], G);
    assert_eq!(v["dirty_bytes"], 0);
    let (s, v) = call(&node, Method::PUT, &format!("{bm}/b"), Some(json!({}))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let body = json!({"granularity_bytes": 1000});
    let (s, v) = call(&node, Method::PUT, &format!("{bm}/odd"), Some(body)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _) = call(&node, Method::PUT, "/v1/exports/nope/bitmaps/b", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&node, Method::GET, &format!("{bm}/nope"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Behind the bearer token like the rest of the API.
    let (s, _) = node
        .call(Method::GET, &format!("{bm}/b"), None, Some("wrong-token"))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (_, v) = call(&node, Method::GET, "/v1/exports/disk", None).await;
    assert_eq!(v["bitmaps"], json!(["b"]));

    // WRITE, WRITE_ZEROES and TRIM, one crossing a granule boundary, one in the
    // export's last granule.
    let writes = [
        (100 << 10, 4096),
        (10 * MIB, MIB),
        (20 * MIB, G),
        (100 * MIB - 4096, 8192),
        (size - 4096, 4096),
    ];
    qemu_io(
        &addr,
        "disk",
        &[
            format!("write -P 1 {} {}", writes[0].0, writes[0].1),
            format!("write -z {} {}", writes[1].0, writes[1].1),
            format!("discard {} {}", writes[2].0, writes[2].1),
            format!("write -P 2 {} {}", writes[3].0, writes[3].1),
            format!("write -P 3 {} {}", writes[4].0, writes[4].1),
        ],
    );
    let want = rounded(&writes, G, size);
    let (s, v) = call(&node, Method::GET, &format!("{bm}/b"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(extents(&v), want);
    assert_eq!(
        v["dirty_bytes"].as_u64().unwrap(),
        want.iter().map(|x| x.1).sum::<u64>()
    );
    assert_eq!(nbdinfo_dirty(&addr, "disk", "b"), want);
    assert_eq!(qemu_img_dirty(&addr, "disk", "b"), want);
    // LIST_META_CONTEXT shows the bitmap next to base:allocation.
    let info: Value = serde_json::from_str(&run_ok(
        Command::new("nbdinfo").args(["--json", &format!("nbd://{addr}/disk")]),
        T,
    ))
    .unwrap();
    let contexts = &info["exports"][0]["contexts"];
    assert!(
        contexts
            .as_array()
            .unwrap()
            .contains(&json!("qemu:dirty-bitmap:b"))
            && contexts
                .as_array()
                .unwrap()
                .contains(&json!("base:allocation")),
        "{contexts}"
    );
    if have_python_libnbd() {
        let out = run_ok(
            Command::new(python()).args(["-c", LIBNBD_BOTH, &format!("nbd://{addr}/disk"), "b"]),
            T,
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        let dirty: Vec<(u64, u64)> = v["dirty"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_u64().unwrap(), e[1].as_u64().unwrap()))
            .collect();
        assert_eq!(merged(dirty), want);
        assert!(v["base"].as_u64().unwrap() >= 1, "{v}");
    } else {
        skip!(
            "SKIPPED (part): python3-libnbd missing, base:allocation + bitmap together not checked"
        );
    }

    // A second bitmap only sees writes after its creation; merge, clear, delete.
    let (s, _) = call(
        &node,
        Method::PUT,
        &format!("{bm}/c"),
        Some(json!({"granularity_bytes": 4096})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    qemu_io(
        &addr,
        "disk",
        &[format!("write -P 4 {} 4096", 50 * MIB + 8192)],
    );
    let (_, v) = call(&node, Method::GET, &format!("{bm}/c"), None).await;
    assert_eq!(extents(&v), [(50 * MIB + 8192, 4096)]);
    let (s, v) = call(&node, Method::POST, &format!("{bm}/b/clear"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["dirty_bytes"], 0);
    let (s, v) = call(
        &node,
        Method::POST,
        &format!("{bm}/b/merge"),
        Some(json!({"from": "c"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, v) = call(&node, Method::GET, &format!("{bm}/b"), None).await;
    assert_eq!(extents(&v), [(50 * MIB, G)]);
    let (s, _) = call(
        &node,
        Method::POST,
        &format!("{bm}/b/merge"),
        Some(json!({"from": "nope"})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A partial clear clears whole granules only.
    let body = json!({"offset": 50 * MIB, "length": 8192 + 4096});
    let (s, v) = call(&node, Method::POST, &format!("{bm}/c/clear"), Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["dirty_bytes"], 0);
    let body = json!({"offset": size, "length": 1});
    let (s, _) = call(&node, Method::POST, &format!("{bm}/c/clear"), Some(body)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = call(&node, Method::DELETE, &format!("{bm}/c"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = call(&node, Method::GET, &format!("{bm}/c"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&node, Method::DELETE, &format!("{bm}/c"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, v) = call(&node, Method::GET, "/v1/exports/disk", None).await;
    assert_eq!(v["bitmaps"], json!(["b"]));
}

/// A deterministic pseudo-random sequence (no extra dependency).
fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_write_and_needs_no_full_resync() {
    if !have_tool("qemu-io") {
        skip!("SKIPPED: qemu-io missing (make deps)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 1024 * MIB;
    let disk = dir.path().join("disk.img");
    sparse_file(&disk, size);
    // A small activity log (8 regions of 4 MiB): the random writes below keep
    // expiring regions, so bits must survive through the bitmap file too.
    let al_regions = 8;
    let node = Node::start(
        &dir.path().join("data"),
        &[
            "--export".into(),
            format!("disk={},unleased", disk.display()),
            "--bitmap-al-regions".into(),
            al_regions.to_string(),
        ],
        None,
    )
    .await;
    let bm = "/v1/exports/disk/bitmaps/b";
    let (s, v) = call(&node, Method::PUT, bm, None).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    let mut seed = 12345;
    let mut writes = Vec::new();
    for round in 0..3 {
        let mut cmds = Vec::new();
        for _ in 0..150 {
            let off = lcg(&mut seed) % (size / 512 - 16) * 512;
            let len = (1 + lcg(&mut seed) % 16) * 512;
            cmds.push(format!("write -P {} {off} {len}", round + 1));
            writes.push((off, len));
        }
        // qemu-io exits once every write is acknowledged.
        qemu_io(&node.nbd_addr(), "disk", &cmds);
    }
    let (_, before) = call(&node, Method::GET, bm, None).await;
    assert_eq!(extents(&before), rounded(&writes, G, size));

    let node = node.kill9_and_restart().await;
    let (s, v) = call(&node, Method::GET, bm, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let after = extents(&v);
    // Every acknowledged write's granules are dirty...
    for (o, l) in rounded(&writes, G, size) {
        assert!(
            after.iter().any(|(a, al)| *a <= o && o + l <= a + al),
            "write range {o}+{l} lost after kill -9: {after:?}"
        );
    }
    // ...and only what the activity log may over-report comes on top.
    let written: u64 = rounded(&writes, G, size).iter().map(|x| x.1).sum();
    let dirty = v["dirty_bytes"].as_u64().unwrap();
    assert!(
        dirty <= written + al_regions * 4 * MIB,
        "{dirty} dirty bytes, {written} written"
    );
    assert!(
        dirty < size / 4,
        "{dirty} of {size} bytes dirty: a full resync"
    );

    // Recovery checkpointed its state and a clear is durable: after a second
    // crash only the region of the one new write comes back.
    let (s, _) = call(&node, Method::POST, &format!("{bm}/clear"), None).await;
    assert_eq!(s, StatusCode::OK);
    qemu_io(&node.nbd_addr(), "disk", &["write -P 9 5M 4k".into()]);
    let node = node.kill9_and_restart().await;
    let (_, v) = call(&node, Method::GET, bm, None).await;
    let after = extents(&v);
    assert!(
        after
            .iter()
            .any(|(a, l)| *a <= 5 * MIB && 5 * MIB + G <= a + l),
        "{after:?}"
    );
    assert!(v["dirty_bytes"].as_u64().unwrap() <= 4 * MIB, "{v}");
}
