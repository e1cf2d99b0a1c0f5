//! The async client (`nbd_client`) against our server and against
//! qemu-nbd (a real peer), with extended headers, structured replies only, and
//! plain simple replies.

// Test helpers panic to report a failure, like the tests that call them.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_client::{Client, ClientOptions, ZeroFlags};
use nbd_proto::consts::*;
use stagehand_tests::{have_tool, pattern, sparse_file, start_nbd};

fn modes(export: &str) -> Vec<ClientOptions> {
    let full = ClientOptions::new(export);
    let mut structured = full.clone();
    structured.extended = false;
    let mut simple = structured.clone();
    simple.structured = false;
    simple.base_allocation = false;
    vec![full, structured, simple]
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Exercises every command; `img` is the file behind the export (4 MiB, zeroed).
async fn exercise(c: Client, img: &Path, peer: &str) {
    let info = c.info().clone();
    assert_eq!(c.size(), 4 << 20, "{peer}");
    let data = pattern(256 << 10, 5);
    c.write(0, &data, false).await.unwrap();
    c.write(1 << 20, &data[..4096], true).await.unwrap();
    assert_eq!(c.read(0, 256 << 10).await.unwrap(), data, "{peer}");
    c.flush().await.unwrap();
    let on_disk = std::fs::read(img).unwrap();
    assert_eq!(
        &on_disk[..256 << 10],
        &data[..],
        "{peer}: flushed data on disk"
    );
    assert_eq!(&on_disk[1 << 20..(1 << 20) + 4096], &data[..4096]);

    // Many requests in flight at once on one connection.
    let c = Arc::new(c);
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let c = Arc::clone(&c);
        let chunk = pattern(8192, 100 + i);
        tasks.push(tokio::spawn(async move {
            c.write((2 << 20) + i * 8192, &chunk, false).await.unwrap();
            assert_eq!(c.read((2 << 20) + i * 8192, 8192).await.unwrap(), chunk);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    if info.has(TFLAG_SEND_WRITE_ZEROES) {
        c.write_zeroes(0, 64 << 10, ZeroFlags::default())
            .await
            .unwrap();
        c.write_zeroes(
            64 << 10,
            64 << 10,
            ZeroFlags {
                no_hole: true,
                fua: true,
                fast: false,
            },
        )
        .await
        .unwrap();
        let r = c.read(0, 256 << 10).await.unwrap();
        assert!(r[..128 << 10].iter().all(|b| *b == 0), "{peer}: zeroes");
        assert_eq!(&r[128 << 10..], &data[128 << 10..]);
    }
    if info.has(TFLAG_SEND_TRIM) {
        c.trim(3 << 20, 1 << 20, false).await.unwrap();
    }
    if info.has(TFLAG_SEND_CACHE) {
        c.cache(0, 1 << 20).await.unwrap();
    }
    if info.base_allocation.is_some() {
        let ext = c.block_status(0, 4 << 20, false).await.unwrap();
        let total: u64 = ext.iter().map(|e| e.length).sum();
        assert!(total > 0 && total <= 4 << 20, "{peer}: {ext:?}");
        let one = c.block_status(0, 4 << 20, true).await.unwrap();
        assert_eq!(one.len(), 1, "{peer}: REQ_ONE");
    }
    // Errors come back as errors, and the connection keeps working.
    let e = c.read((4 << 20) - 10, 4096).await.unwrap_err();
    assert_eq!(e.errno(), Some(EINVAL), "{peer}: {e}");
    assert_eq!(c.read(0, 16).await.unwrap().len(), 16);
    let c = Arc::into_inner(c).expect("all tasks done");
    c.disconnect().await.unwrap();
}

#[test]
fn client_against_stagehand_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.img");
    let sock = dir.path().join("c.sock");
    sparse_file(&img, 4 << 20);
    let d = start_nbd(&[
        "--unix",
        sock.to_str().unwrap(),
        "--export",
        &format!("c={},unleased", img.display()),
    ]);
    let addr = d.tcp.clone().unwrap();
    rt().block_on(async {
        for (i, opts) in modes("c").into_iter().enumerate() {
            sparse_file(&img, 4 << 20);
            let want_ext = opts.extended;
            let want_structured = opts.structured;
            let c = if i == 1 {
                Client::connect_unix(&sock, opts).await.unwrap()
            } else {
                Client::connect_tcp(&addr, opts).await.unwrap()
            };
            assert_eq!(c.info().extended, want_ext);
            assert_eq!(c.info().structured, want_structured);
            assert_eq!(c.info().block_size, Some((1, 4096, 32 << 20)));
            exercise(c, &img, "stagehand-nbd").await;
        }
        // Refusals: unknown export, lease token on an unleased export.
        let e = Client::connect_tcp(&addr, ClientOptions::new("nope"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        let e = Client::connect_tcp(&addr, ClientOptions::new("c;lease=00"))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains(&format!("{REP_ERR_POLICY:#x}")),
            "{e}"
        );
    });
}

struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn client_against_qemu_nbd() {
    if !have_tool("qemu-nbd") {
        stagehand_tests::skip!("SKIPPED: qemu-nbd missing (run `make deps`)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.img");
    let sock = dir.path().join("q.sock");
    sparse_file(&img, 4 << 20);
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            "q",
            "--persistent",
            "--shared=8",
            "--discard=unmap",
            "--cache=writeback",
            "-k",
        ])
        .arg(&sock)
        .arg(&img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-nbd");
    let _guard = QemuNbd(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // qemu-nbd negotiates extended headers from 8.2 on (Debian 12 ships 7.2, its
    // backports 10): ask the one installed, rather than assume.
    let offers_ext = offers_extended_headers(&sock);
    rt().block_on(async {
        for opts in modes("q") {
            sparse_file(&img, 4 << 20);
            let want_ext = opts.extended && offers_ext;
            let c = Client::connect_unix(&sock, opts).await.unwrap();
            assert_eq!(
                c.info().extended,
                want_ext,
                "extended headers asked for and offered: {offers_ext}"
            );
            exercise(c, &img, "qemu-nbd").await;
        }
    });
}

/// Whether the server on `sock` acknowledges NBD_OPT_EXTENDED_HEADERS: a bare
/// handshake (greeting, flags, the option, ABORT), independent of our client.
fn offers_extended_headers(sock: &std::path::Path) -> bool {
    use nbd_proto::consts::{
        FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, OPT_EXTENDED_HEADERS, REP_ACK,
    };
    use nbd_proto::{ClientOption, GREETING_LEN, OPTION_REPLY_HEADER_LEN, OptionReplyHeader};
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; GREETING_LEN];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut out = Vec::new();
    ClientOption::ExtendedHeaders.encode(&mut out);
    s.write_all(&out).unwrap();
    let mut hb = [0u8; OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut hb).unwrap();
    let h = OptionReplyHeader::decode(&hb).unwrap();
    assert_eq!(h.option, OPT_EXTENDED_HEADERS);
    let mut payload = vec![0u8; h.length as usize];
    s.read_exact(&mut payload).unwrap();
    out.clear();
    ClientOption::Abort.encode(&mut out);
    let _ = s.write_all(&out);
    h.reply_type == REP_ACK
}
