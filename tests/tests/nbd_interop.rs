//! stagehand-nbd against real NBD clients: nbdinfo, qemu-img, qemu-io, nbdcopy, fio.
//! qemu 10 negotiates extended headers; libnbd 1.14 (nbdinfo, nbdcopy, fio) does
//! not, so both reply formats are exercised.

// Test helpers panic to report a failure, like the tests that call them.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use stagehand_tests::{pattern, require_tool, run_ok, run_timeout, sparse_file, start_nbd};

const T: Duration = Duration::from_secs(120);

fn uri(d: &stagehand_tests::Daemon, export: &str) -> String {
    format!("nbd://{}/{export}", d.tcp.as_deref().expect("tcp listener"))
}

#[test]
fn nbdinfo_reports_size_and_every_flag_as_advertised() {
    require_tool!("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let rw = dir.path().join("rw.img");
    let ro = dir.path().join("ro.img");
    sparse_file(&rw, 64 << 20);
    sparse_file(&ro, 3 << 20);
    let d = start_nbd(&[
        "--export",
        &format!("rw={},unleased", rw.display()),
        "--export",
        &format!("ro={},ro,unleased", ro.display()),
    ]);
    let j: serde_json::Value = serde_json::from_str(&run_ok(
        Command::new("nbdinfo").args(["--json", &uri(&d, "rw")]),
        T,
    ))
    .unwrap();
    assert_eq!(j["protocol"], "newstyle-fixed");
    assert_eq!(j["structured"], true);
    let e = &j["exports"][0];
    assert_eq!(e["export-size"], 64u64 << 20);
    assert_eq!(e["is_read_only"], false);
    for flag in [
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_rotational"], false);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32u64 << 20);
    assert!(
        e["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "base:allocation")
    );

    let j: serde_json::Value = serde_json::from_str(&run_ok(
        Command::new("nbdinfo").args(["--json", &uri(&d, "ro")]),
        T,
    ))
    .unwrap();
    let e = &j["exports"][0];
    assert_eq!(e["export-size"], 3u64 << 20);
    assert_eq!(e["is_read_only"], true);
    for flag in ["can_fast_zero", "can_fua", "can_trim", "can_zero"] {
        assert_eq!(e[flag], false, "{flag} in {e}");
    }
    for flag in ["can_flush", "can_multi_conn", "can_cache", "can_df"] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }

    // NBD_OPT_LIST names both exports.
    let list = run_ok(
        Command::new("nbdinfo").args(["--list", "--json", &uri(&d, "")]),
        T,
    );
    let j: serde_json::Value = serde_json::from_str(&list).unwrap();
    let mut names: Vec<_> = j["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].clone())
        .collect();
    names.sort_by_key(|n| n.to_string());
    assert_eq!(names, ["ro", "rw"]);

    // An unknown export is refused, and the server keeps serving.
    let out = run_timeout(Command::new("nbdinfo").arg(uri(&d, "nope")), T).unwrap();
    assert!(!out.status.success());
    run_ok(Command::new("nbdinfo").arg(uri(&d, "rw")), T);
}

#[test]
fn nbdinfo_map_shows_holes_and_data() {
    require_tool!("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.img");
    sparse_file(&img, 16 << 20);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&pattern(1 << 20, 1), 4 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let d = start_nbd(&["--export", &format!("s={},ro,unleased", img.display())]);
    let map = run_ok(
        Command::new("nbdinfo").args(["--map", "--json", &uri(&d, "s")]),
        T,
    );
    let j: serde_json::Value = serde_json::from_str(&map).unwrap();
    let extents = j.as_array().unwrap();
    let total: u64 = extents.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 16 << 20);
    let kind_at = |off: u64| {
        extents
            .iter()
            .find(|e| {
                let o = e["offset"].as_u64().unwrap();
                o <= off && off < o + e["length"].as_u64().unwrap()
            })
            .map(|e| e["type"].as_u64().unwrap())
            .unwrap()
    };
    assert_eq!(kind_at(0), 3, "start is hole+zero: {map}");
    assert_eq!(kind_at(4 << 20), 0, "written MiB is data: {map}");
    assert_eq!(kind_at((5 << 20) - 1), 0);
    assert_eq!(kind_at(15 << 20), 3);
}

#[test]
fn qemu_img_convert_both_ways_and_compare() {
    require_tool!("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let img = dir.path().join("disk.img");
    let back = dir.path().join("back.raw");
    // Data, a hole, more data: exercises block status and sparse copying.
    let mut data = pattern(24 << 20, 7);
    data[8 << 20..16 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    sparse_file(&img, 24 << 20);
    let d = start_nbd(&["--export", &format!("disk={},unleased", img.display())]);
    let u = uri(&d, "disk");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&u),
        T,
    );
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&u),
        T,
    );
    assert!(out.contains("identical"), "{out}");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&u)
            .arg(&back),
        T,
    );
    assert!(std::fs::read(&back).unwrap() == data, "round trip differs");
    assert!(std::fs::read(&img).unwrap() == data, "export file differs");
    // qemu-img map goes through BLOCK_STATUS with extended headers.
    let map = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&u),
        T,
    );
    let j: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert!(j.as_array().unwrap().iter().any(|e| e["data"] == true));
}

#[test]
fn qemu_io_write_read_zero_discard_flush() {
    require_tool!("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.img");
    sparse_file(&img, 8 << 20);
    let d = start_nbd(&["--export", &format!("q={},unleased", img.display())]);
    let u = uri(&d, "q");
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .args([
                "-c",
                "write -P 0x5a 0 2M",
                "-c",
                "read -P 0x5a 0 2M",
                "-c",
                "write -z 512k 256k",
                "-c",
                "read -P 0 512k 256k",
                "-c",
                "write -P 0x33 3M 4k",
                "-c",
                "write -z -u 1M 128k",
                "-c",
                "discard 1536k 64k",
                "-c",
                "read -P 0 1536k 64k",
                "-c",
                "write -f -P 0x44 4M 64k",
                "-c",
                "flush",
            ])
            .arg(&u),
        T,
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let f = std::fs::read(&img).unwrap();
    assert!(f[..512 << 10].iter().all(|b| *b == 0x5a));
    assert!(f[512 << 10..768 << 10].iter().all(|b| *b == 0));
    assert!(f[768 << 10..1 << 20].iter().all(|b| *b == 0x5a));
    assert!(f[1 << 20..(1 << 20) + (128 << 10)].iter().all(|b| *b == 0));
    assert!(f[1536 << 10..1600 << 10].iter().all(|b| *b == 0));
    assert!(f[3 << 20..(3 << 20) + 4096].iter().all(|b| *b == 0x33));
    assert!(
        f[4 << 20..(4 << 20) + (64 << 10)]
            .iter()
            .all(|b| *b == 0x44)
    );
}

#[test]
fn nbdcopy_both_ways_with_four_connections() {
    require_tool!("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let img = dir.path().join("disk.img");
    let back = dir.path().join("back.raw");
    let mut data = pattern(32 << 20, 11);
    data[4 << 20..12 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    sparse_file(&img, 32 << 20);
    let d = start_nbd(&["--export", &format!("disk={},unleased", img.display())]);
    let u = uri(&d, "disk");
    run_ok(
        Command::new("nbdcopy").args(["-C", "4"]).arg(&src).arg(&u),
        T,
    );
    run_ok(
        Command::new("nbdcopy").args(["-C", "4"]).arg(&u).arg(&back),
        T,
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "nbdcopy round trip differs"
    );
    assert!(std::fs::read(&img).unwrap() == data);
}

#[test]
fn fio_nbd_engine_verifies_crc32c() {
    require_tool!("fio");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.img");
    sparse_file(&img, 16 << 20);
    let d = start_nbd(&["--export", &format!("f={},unleased", img.display())]);
    let out = run_ok(
        // fio writes a verify state file into its working directory.
        Command::new("fio").current_dir(dir.path()).args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", uri(&d, "f")),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--output-format=json",
        ]),
        T,
    );
    let j: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(j["jobs"][0]["error"], 0, "{out}");
    assert!(
        j["jobs"][0]["read"]["io_bytes"].as_u64().unwrap() > 0,
        "verify pass read nothing"
    );
}

#[test]
fn unix_socket_and_thread_engine() {
    require_tool!("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("u.img");
    let sock = dir.path().join("nbd.sock");
    sparse_file(&img, 4 << 20);
    let d = start_nbd(&[
        "--listen",
        "none",
        "--unix",
        sock.to_str().unwrap(),
        "--io-engine",
        "threads",
        "--export",
        &format!("u={},unleased", img.display()),
    ]);
    let u = format!("nbd+unix:///u?socket={}", sock.display());
    let out = run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x77 4k 64k",
                "-c",
                "read -P 0x77 4k 64k",
            ])
            .arg(&u),
        T,
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let f = std::fs::read(&img).unwrap();
    assert!(f[4096..4096 + (64 << 10)].iter().all(|b| *b == 0x77));
    let (ok, log) = d.terminate(Duration::from_secs(10));
    assert!(ok, "unclean exit: {log}");
    assert!(
        log.contains("engine=\"threads\""),
        "thread engine not used: {log}"
    );
    assert!(!sock.exists(), "socket file left behind");
}

#[test]
fn sigterm_shuts_down_cleanly_with_data_on_disk() {
    require_tool!("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.img");
    sparse_file(&img, 4 << 20);
    let d = start_nbd(&["--export", &format!("t={},unleased", img.display())]);
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x42 0 1M"])
            .arg(uri(&d, "t")),
        T,
    );
    let (ok, log) = d.terminate(Duration::from_secs(10));
    assert!(ok, "unclean exit: {log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(
        std::fs::read(&img).unwrap()[..1 << 20]
            .iter()
            .all(|b| *b == 0x42)
    );
}

#[test]
fn memory_filesystem_export_uses_the_inline_path_correctly() {
    require_tool!("nbdcopy");
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        stagehand_tests::skip!("SKIPPED: /dev/shm (tmpfs) missing");
        return;
    };
    let img = dir.path().join("m.img");
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    let mut data = pattern(16 << 20, 21);
    data[2 << 20..6 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    sparse_file(&img, 16 << 20);
    let sock = dir.path().join("m.sock");
    let d = start_nbd(&[
        "--unix",
        sock.to_str().unwrap(),
        "--export",
        &format!("m={},unleased", img.display()),
    ]);
    let u = uri(&d, "m");
    run_ok(
        Command::new("nbdcopy")
            .args(["-C", "4", "--request-size=65536"])
            .arg(&src)
            .arg(&u),
        T,
    );
    // 256 KiB reads (nbdcopy's default) go out with sendfile, over TCP and Unix.
    run_ok(
        Command::new("nbdcopy").args(["-C", "4"]).arg(&u).arg(&back),
        T,
    );
    let back2 = dir.path().join("back2.raw");
    let unix = format!("nbd+unix:///m?socket={}", sock.display());
    run_ok(
        Command::new("nbdcopy")
            .args(["-C", "2", "--request-size=524288"])
            .arg(&unix)
            .arg(&back2),
        T,
    );
    assert!(
        std::fs::read(&back2).unwrap() == data,
        "sendfile over a Unix socket differs"
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "round trip through tmpfs differs"
    );
    if stagehand_tests::have_tool("qemu-io") {
        let out = run_ok(
            Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0x61 1M 4k",
                    "-c",
                    "read -P 0x61 1M 4k",
                ])
                .arg(&u),
            T,
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
}

/// Detaches a loop device on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_device_export() {
    require_tool!("losetup");
    require_tool!("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("loop.img");
    sparse_file(&backing, 16 << 20);
    let out = run_timeout(
        Command::new("losetup").args(["-f", "--show"]).arg(&backing),
        T,
    )
    .unwrap();
    if !out.status.success() {
        stagehand_tests::skip!(
            "SKIPPED: loop devices missing ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return;
    }
    let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    let d = start_nbd(&["--export", &format!("blk={},unleased", dev.0)]);
    let u = uri(&d, "blk");
    let info = run_ok(Command::new("nbdinfo").args(["--json", &u]), T);
    let j: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(j["exports"][0]["export-size"], 16u64 << 20, "BLKGETSIZE64");
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .args([
                "-c",
                "write -P 0x5a 0 2M",
                "-c",
                "write -z 64k 64k",
                "-c",
                "discard 1M 64k",
                "-c",
                "read -P 0 64k 64k",
                "-c",
                "read -P 0x5a 0 64k",
                "-c",
                "flush",
            ])
            .arg(&u),
        T,
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // FAST_ZERO cannot be promised on a block device: qemu falls back, still zeroes.
    run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -z -u 1536k 64k",
                "-c",
                "read -P 0 1536k 64k",
            ])
            .arg(&u),
        T,
    );
    drop(d);
    let f = std::fs::read(&backing).unwrap();
    assert!(f[..64 << 10].iter().all(|b| *b == 0x5a));
    assert!(f[64 << 10..128 << 10].iter().all(|b| *b == 0));
    assert!(f[128 << 10..1 << 20].iter().all(|b| *b == 0x5a));
}
