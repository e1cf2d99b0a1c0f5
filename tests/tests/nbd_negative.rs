//! Malformed and hostile input over raw sockets: every case gets the spec's answer
//! (an error reply or a clean disconnect), and the server keeps serving others.

// Test helpers panic to report a failure, like the tests that call them.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use nbd_proto::{
    self as codec, ChunkPayload, ClientOption, InfoRequest, MetaContextRequest, OptionReply,
    OptionReplyHeader, ReplyHeader, Request, consts::*,
};
use stagehand_tests::{Daemon, pattern, sparse_file, start_nbd};

struct Raw {
    s: TcpStream,
    structured: bool,
    extended: bool,
}

#[derive(Debug, Default)]
struct Reply {
    cookie: u64,
    error: u32,
    data: Vec<u8>,
    hole: bool,
}

fn open(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Greeting and client flags; returns the stream ready for options.
fn start(addr: &str) -> TcpStream {
    let mut s = open(addr);
    let mut g = [0u8; codec::GREETING_LEN];
    s.read_exact(&mut g).unwrap();
    let g = codec::Greeting::decode(&g).unwrap();
    assert_eq!(g.flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s
}

fn send_opt(s: &mut TcpStream, opt: &ClientOption) {
    let mut out = Vec::new();
    opt.encode(&mut out);
    s.write_all(&out).unwrap();
}

fn opt_reply(s: &mut TcpStream) -> (u32, OptionReply) {
    let mut h = [0u8; codec::OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = OptionReplyHeader::decode(&h).unwrap();
    let mut d = vec![0u8; h.length as usize];
    s.read_exact(&mut d).unwrap();
    (h.option, OptionReply::decode(h.reply_type, &d).unwrap())
}

fn ack(s: &mut TcpStream, opt: ClientOption) -> bool {
    send_opt(s, &opt);
    matches!(opt_reply(s).1, OptionReply::Ack)
}

fn go(mut s: TcpStream, export: &str, structured: bool, extended: bool, meta: bool) -> Raw {
    if extended {
        assert!(ack(&mut s, ClientOption::ExtendedHeaders));
    } else if structured {
        assert!(ack(&mut s, ClientOption::StructuredReply));
    }
    if meta {
        send_opt(
            &mut s,
            &ClientOption::SetMetaContext(MetaContextRequest {
                export: export.into(),
                queries: vec!["base:allocation".into()],
            }),
        );
        loop {
            if matches!(opt_reply(&mut s).1, OptionReply::Ack) {
                break;
            }
        }
    }
    send_opt(
        &mut s,
        &ClientOption::Go(InfoRequest {
            name: export.into(),
            requests: vec![],
        }),
    );
    go_answered(&mut s);
    Raw {
        s,
        structured,
        extended,
    }
}

/// Reads the server's answer to NBD_OPT_GO (INFO replies, then ACK).
fn go_answered(s: &mut TcpStream) {
    loop {
        match opt_reply(s).1 {
            OptionReply::Ack => break,
            OptionReply::Info(_) => {}
            other => panic!("GO refused: {other:?}"),
        }
    }
}

/// A compact WRITE request header (its payload follows it on the wire).
fn write_header(cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut out = Vec::new();
    Request {
        flags: 0,
        command: CMD_WRITE,
        cookie,
        offset,
        length,
    }
    .encode(false, &mut out);
    out
}

fn connect(d: &Daemon, export: &str, structured: bool, extended: bool) -> Raw {
    go(
        start(d.tcp.as_deref().unwrap()),
        export,
        structured,
        extended,
        false,
    )
}

impl Raw {
    fn send(
        &mut self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) {
        let mut out = Vec::new();
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(self.extended, &mut out);
        out.extend_from_slice(payload);
        self.s.write_all(&out).unwrap();
    }

    /// Reads one whole reply (all chunks up to DONE). `read_len` is what a simple
    /// reply to a successful READ carries.
    fn reply(&mut self, read_len: usize) -> Reply {
        let mut r = Reply::default();
        loop {
            let mut hb = [0u8; 32];
            self.s.read_exact(&mut hb[..4]).unwrap();
            let magic = u32::from_be_bytes([hb[0], hb[1], hb[2], hb[3]]);
            let hl = ReplyHeader::len_for_magic(magic).expect("reply magic");
            self.s.read_exact(&mut hb[4..hl]).unwrap();
            match ReplyHeader::decode(&hb[..hl]).unwrap() {
                ReplyHeader::Simple { error, cookie } => {
                    r.cookie = cookie;
                    r.error = error;
                    if error == 0 && read_len > 0 {
                        r.data = vec![0; read_len];
                        self.s.read_exact(&mut r.data).unwrap();
                    }
                    return r;
                }
                ReplyHeader::Chunk {
                    flags,
                    chunk_type,
                    cookie,
                    length,
                    extended,
                    ..
                } => {
                    assert_eq!(extended, self.extended);
                    assert!(self.structured);
                    r.cookie = cookie;
                    let mut d = vec![0u8; length as usize];
                    self.s.read_exact(&mut d).unwrap();
                    match chunk_type {
                        REPLY_TYPE_OFFSET_DATA => r.data.extend_from_slice(&d[8..]),
                        _ => match ChunkPayload::decode(chunk_type, &d, length).unwrap() {
                            ChunkPayload::Error { error, .. } => r.error = error,
                            ChunkPayload::OffsetHole { length, .. } => {
                                r.hole = true;
                                r.data.extend(std::iter::repeat_n(0, length as usize));
                            }
                            _ => {}
                        },
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return r;
                    }
                }
            }
        }
    }

    /// True when the server closed the connection (EOF or reset) within the timeout.
    fn closed(&mut self) -> bool {
        is_closed(&mut self.s)
    }
}

fn is_closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn server(dir: &std::path::Path) -> (Daemon, std::path::PathBuf) {
    let img = dir.join("n.img");
    sparse_file(&img, 4 << 20);
    let ro = dir.join("ro.img");
    std::fs::write(&ro, pattern(1 << 20, 3)).unwrap();
    let d = start_nbd(&[
        "--export",
        &format!("n={},unleased", img.display()),
        "--export",
        &format!("ro={},ro,unleased", ro.display()),
    ]);
    (d, img)
}

/// The server still answers a fresh, well-behaved client.
fn still_serving(d: &Daemon) {
    let mut c = connect(d, "n", true, false);
    c.send(0, CMD_READ, 99, 0, 4096, &[]);
    let r = c.reply(4096);
    assert_eq!((r.cookie, r.error, r.data.len()), (99, 0, 4096));
}

#[test]
fn bad_option_magic_and_unknown_client_flags_close_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = server(dir.path());
    let addr = d.tcp.clone().unwrap();
    let mut s = start(&addr);
    s.write_all(b"GARBAGE!GARBAGE!").unwrap();
    assert!(is_closed(&mut s));

    let mut s = open(&addr);
    let mut g = [0u8; codec::GREETING_LEN];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert!(is_closed(&mut s));
    still_serving(&d);
}

#[test]
fn unknown_option_starttls_and_oversized_option_are_refused_and_haggling_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = server(dir.path());
    let mut s = start(d.tcp.as_deref().unwrap());
    send_opt(
        &mut s,
        &ClientOption::Unknown {
            option: 42,
            data: vec![1, 2, 3],
        },
    );
    assert_eq!(
        opt_reply(&mut s),
        (
            42,
            OptionReply::Error {
                code: REP_ERR_UNSUP,
                message: "option not supported".into()
            }
        )
    );
    send_opt(&mut s, &ClientOption::StartTls);
    let (o, r) = opt_reply(&mut s);
    assert_eq!(o, OPT_STARTTLS);
    assert!(
        matches!(
            r,
            OptionReply::Error {
                code: REP_ERR_UNSUP,
                ..
            }
        ),
        "{r:?}"
    );
    // 1 MiB of option data: skipped without buffering, answered ERR_TOO_BIG.
    let mut out = Vec::new();
    codec::OptionHeader {
        option: OPT_GO,
        length: 1 << 20,
    }
    .encode(&mut out);
    out.extend(std::iter::repeat_n(0u8, 1 << 20));
    s.write_all(&out).unwrap();
    assert!(matches!(
        opt_reply(&mut s).1,
        OptionReply::Error {
            code: REP_ERR_TOO_BIG,
            ..
        }
    ));
    // Malformed GO payload: ERR_INVALID.
    send_opt(
        &mut s,
        &ClientOption::Unknown {
            option: OPT_GO,
            data: vec![0, 0, 0, 9, b'x'],
        },
    );
    assert!(matches!(
        opt_reply(&mut s).1,
        OptionReply::Error {
            code: REP_ERR_INVALID,
            ..
        }
    ));
    // Unknown export: ERR_UNKNOWN; then a good GO still works.
    send_opt(
        &mut s,
        &ClientOption::Go(InfoRequest {
            name: "nope".into(),
            requests: vec![],
        }),
    );
    assert!(matches!(
        opt_reply(&mut s).1,
        OptionReply::Error {
            code: REP_ERR_UNKNOWN,
            ..
        }
    ));
    // SET_META_CONTEXT before structured replies: ERR_INVALID.
    send_opt(
        &mut s,
        &ClientOption::SetMetaContext(MetaContextRequest {
            export: "n".into(),
            queries: vec![],
        }),
    );
    assert!(matches!(
        opt_reply(&mut s).1,
        OptionReply::Error {
            code: REP_ERR_INVALID,
            ..
        }
    ));
    // A lease token on an unleased export: ERR_POLICY.
    send_opt(
        &mut s,
        &ClientOption::Go(InfoRequest {
            name: "n;lease=abc".into(),
            requests: vec![],
        }),
    );
    assert!(matches!(
        opt_reply(&mut s).1,
        OptionReply::Error {
            code: REP_ERR_POLICY,
            ..
        }
    ));
    let mut c = go(s, "n", false, false, false);
    c.send(0, CMD_READ, 5, 0, 512, &[]);
    assert_eq!(c.reply(512).error, 0);
}

#[test]
fn export_name_and_abort() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = server(dir.path());
    let addr = d.tcp.clone().unwrap();
    let mut s = start(&addr);
    send_opt(&mut s, &ClientOption::ExportName("n".into()));
    let mut b = [0u8; codec::EXPORT_NAME_REPLY_LEN];
    s.read_exact(&mut b).unwrap();
    let (size, flags) = codec::decode_export_name_reply(&b).unwrap();
    assert_eq!(size, 4 << 20);
    assert_ne!(flags & TFLAG_HAS_FLAGS, 0);
    // NO_ZEROES was negotiated: the next bytes are a reply to our first request.
    let mut c = Raw {
        s,
        structured: false,
        extended: false,
    };
    c.send(0, CMD_FLUSH, 1, 0, 0, &[]);
    assert_eq!(c.reply(0).error, 0);

    let mut s = start(&addr);
    send_opt(&mut s, &ClientOption::ExportName("nope".into()));
    assert!(is_closed(&mut s));

    let mut s = start(&addr);
    send_opt(&mut s, &ClientOption::Abort);
    assert_eq!(opt_reply(&mut s).1, OptionReply::Ack);
    assert!(is_closed(&mut s));
    still_serving(&d);
}

#[test]
fn bad_request_magic_after_handshake_is_a_hard_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = server(dir.path());
    let mut c = connect(&d, "n", true, false);
    c.s.write_all(&[0xde; 28]).unwrap();
    assert!(c.closed());
    // Compact header once extended headers were negotiated: also a violation.
    let mut c = connect(&d, "n", true, true);
    let mut out = Vec::new();
    Request {
        flags: 0,
        command: CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode(false, &mut out);
    out.extend_from_slice(&[0; 4]);
    c.s.write_all(&out).unwrap();
    assert!(c.closed());
    still_serving(&d);
}

#[test]
fn bad_requests_get_the_spec_errors_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = server(dir.path());
    for (structured, extended) in [(false, false), (true, false), (true, true)] {
        let mut c = connect(&d, "n", structured, extended);
        let size = 4u64 << 20;
        c.send(0, 99, 1, 0, 0, &[]);
        assert_eq!(c.reply(0).error, EINVAL, "unknown command");
        c.send(1 << 9, CMD_FLUSH, 2, 0, 0, &[]);
        assert_eq!(c.reply(0).error, EINVAL, "unknown flag");
        c.send(0, CMD_READ, 3, size - 100, 4096, &[]);
        assert_eq!(c.reply(4096).error, EINVAL, "read past the end");
        c.send(0, CMD_READ, 4, u64::MAX - 10, 4096, &[]);
        assert_eq!(c.reply(4096).error, EINVAL, "offset overflow");
        c.send(0, CMD_WRITE, 5, size - 100, 4096, &[7u8; 4096]);
        assert_eq!(c.reply(0).error, ENOSPC, "write past the end");
        c.send(0, CMD_WRITE_ZEROES, 6, size, 4096, &[]);
        assert_eq!(c.reply(0).error, ENOSPC, "zero past the end");
        c.send(0, CMD_TRIM, 7, size, 1, &[]);
        assert_eq!(c.reply(0).error, EINVAL, "trim past the end");
        c.send(0, CMD_READ, 8, 0, 33 << 20, &[]);
        let want = if structured { EOVERFLOW } else { EINVAL };
        assert_eq!(c.reply(0).error, want, "read above the maximum payload");
        c.send(0, CMD_BLOCK_STATUS, 9, 0, 4096, &[]);
        assert_eq!(
            c.reply(0).error,
            EINVAL,
            "block status without a meta context"
        );
        c.send(CMD_FLAG_NO_HOLE, CMD_WRITE, 10, 0, 4, &[1, 2, 3, 4]);
        assert_eq!(c.reply(0).error, EINVAL, "NO_HOLE on a write");
        if !structured {
            c.send(CMD_FLAG_DF, CMD_READ, 11, 0, 512, &[]);
            assert_eq!(c.reply(512).error, EINVAL, "DF without structured replies");
        }
        // The connection is still in sync: a write and read back work.
        c.send(CMD_FLAG_FUA, CMD_WRITE, 12, 8192, 4, b"abcd");
        assert_eq!(c.reply(0).error, 0);
        c.send(0, CMD_READ, 13, 8192, 4, &[]);
        let r = c.reply(4);
        assert_eq!((r.cookie, r.error, &r.data[..]), (13, 0, &b"abcd"[..]));
        c.send(0, CMD_DISC, 14, 0, 0, &[]);
        assert!(c.closed());
    }
}

#[test]
fn oversized_write_is_refused_then_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = server(dir.path());
    let mut c = connect(&d, "n", true, false);
    c.send(0, CMD_WRITE, 1, 0, 64 << 20, &[]);
    assert_eq!(c.reply(0).error, EINVAL);
    assert!(c.closed());
    let mut c = connect(&d, "n", true, true);
    c.send(0, CMD_WRITE, 1, 0, 1 << 40, &[]);
    assert_eq!(c.reply(0).error, EOVERFLOW);
    assert!(c.closed());
    still_serving(&d);
}

#[test]
fn writes_to_a_read_only_export_get_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = server(dir.path());
    let before = std::fs::read(dir.path().join("ro.img")).unwrap();
    let mut c = connect(&d, "ro", true, false);
    c.send(0, CMD_WRITE, 1, 0, 4, b"evil");
    assert_eq!(c.reply(0).error, EPERM);
    c.send(0, CMD_TRIM, 2, 0, 4096, &[]);
    assert_eq!(c.reply(0).error, EPERM);
    c.send(0, CMD_WRITE_ZEROES, 3, 0, 4096, &[]);
    assert_eq!(c.reply(0).error, EPERM);
    c.send(0, CMD_READ, 4, 0, 16, &[]);
    let r = c.reply(16);
    assert_eq!((r.error, &r.data[..]), (0, &before[..16]));
    assert_eq!(std::fs::read(dir.path().join("ro.img")).unwrap(), before);
}

#[test]
fn client_vanishing_mid_payload_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (d, img) = server(dir.path());
    let mut c = connect(&d, "n", true, false);
    let mut out = write_header(1, 0, 1 << 20);
    out.extend_from_slice(&[0xee; 100 << 10]);
    c.s.write_all(&out).unwrap();
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    still_serving(&d);
    let f = std::fs::File::open(&img).unwrap();
    let mut b = vec![0u8; 1 << 20];
    f.read_exact_at(&mut b, 0).unwrap();
    assert!(
        b.iter().all(|x| *x == 0),
        "a partial payload reached the disk"
    );
}

/// Large WRITE payloads are taken whole whatever shape they arrive in: trickling
/// in pieces, in one segment with the GO option (so part of the request sits in the
/// handshake's buffer), or with the next request right behind. A server that waits
/// for bytes the client does not owe (a receive low-water mark set too high, a
/// buffer not accounted for) hangs here; the sockets' 10 s timeouts turn that into
/// a failure. Checked against such a server (SO_RCVLOWAT ignoring buffered bytes).
#[test]
fn large_write_payloads_arriving_in_any_shape_are_written_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (d, img) = server(dir.path());
    let a = pattern(1 << 20, 21);
    let b = pattern(1 << 20, 22);
    let c = pattern(300 << 10, 23);

    // GO and a whole 1 MiB write in one segment, before the GO reply is read.
    let mut s = start(d.tcp.as_deref().unwrap());
    assert!(ack(&mut s, ClientOption::StructuredReply));
    let mut out = Vec::new();
    ClientOption::Go(InfoRequest {
        name: "n".into(),
        requests: vec![],
    })
    .encode(&mut out);
    out.extend_from_slice(&write_header(1, 0, a.len() as u64));
    out.extend_from_slice(&a);
    s.write_all(&out).unwrap();
    go_answered(&mut s);
    let mut raw = Raw {
        s,
        structured: true,
        extended: false,
    };
    let r = raw.reply(0);
    assert_eq!((r.cookie, r.error), (1, 0));

    // A payload in uneven pieces with pauses, then two requests back to back in
    // one write (the second's header arrives with the first's payload).
    let mut out = write_header(2, 1 << 20, b.len() as u64);
    out.extend_from_slice(&b[..100 << 10]);
    raw.s.write_all(&out).unwrap();
    for piece in [
        &b[100 << 10..500 << 10],
        &b[500 << 10..(1 << 20) - 1],
        &b[(1 << 20) - 1..],
    ] {
        std::thread::sleep(Duration::from_millis(30));
        raw.s.write_all(piece).unwrap();
    }
    let r = raw.reply(0);
    assert_eq!((r.cookie, r.error), (2, 0));
    let mut out = write_header(3, 2 << 20, c.len() as u64);
    out.extend_from_slice(&c);
    out.extend_from_slice(&write_header(4, 3 << 20, c.len() as u64));
    out.extend_from_slice(&c[..200 << 10]);
    raw.s.write_all(&out).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    raw.s.write_all(&c[200 << 10..]).unwrap();
    let mut cookies = [raw.reply(0), raw.reply(0)].map(|r| {
        assert_eq!(r.error, 0);
        r.cookie
    });
    cookies.sort();
    assert_eq!(cookies, [3, 4]);

    // Everything landed where it should, and reads still work on this connection.
    raw.send(0, CMD_READ, 5, 1 << 20, 4096, &[]);
    let r = raw.reply(4096);
    assert_eq!((r.cookie, r.error, &r.data[..]), (5, 0, &b[..4096]));
    let f = std::fs::File::open(&img).unwrap();
    for (offset, want) in [(0u64, &a), (1 << 20, &b), (2 << 20, &c), (3 << 20, &c)] {
        let mut got = vec![0u8; want.len()];
        f.read_exact_at(&mut got, offset).unwrap();
        assert!(got == *want, "payload at {offset} differs");
    }
}

#[test]
fn many_requests_in_flight_on_many_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _) = server(dir.path());
    let data = pattern(1 << 20, 9);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let addr = d.tcp.clone().unwrap();
            let data = data.clone();
            std::thread::spawn(move || {
                let mut c = go(start(&addr), "n", t % 2 == 0, t == 2, false);
                let base = t << 20;
                // 64 writes pipelined before any reply is read.
                for i in 0..64u64 {
                    let off = i * 16384;
                    c.send(
                        0,
                        CMD_WRITE,
                        1000 + i,
                        base + off,
                        16384,
                        &data[off as usize..off as usize + 16384],
                    );
                }
                let mut seen = std::collections::HashSet::new();
                for _ in 0..64 {
                    let r = c.reply(0);
                    assert_eq!(r.error, 0);
                    assert!(seen.insert(r.cookie));
                }
                for i in 0..64u64 {
                    c.send(0, CMD_READ, 2000 + i, base + i * 16384, 16384, &[]);
                }
                for _ in 0..64 {
                    let r = c.reply(16384);
                    let i = r.cookie - 2000;
                    assert!(i < 64);
                    assert_eq!(
                        &r.data[..],
                        &data[(i * 16384) as usize..((i + 1) * 16384) as usize]
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn block_status_and_holes_with_both_header_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let (d, img) = server(dir.path());
    {
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[1u8; 65536], 1 << 20).unwrap();
    }
    for extended in [false, true] {
        let mut c = go(start(d.tcp.as_deref().unwrap()), "n", true, extended, true);
        // A large read of a hole comes back as one OFFSET_HOLE chunk.
        c.send(0, CMD_READ, 1, 2 << 20, 1 << 20, &[]);
        let r = c.reply(0);
        assert!(r.hole && r.data.len() == 1 << 20 && r.data.iter().all(|b| *b == 0));
        // With DF the data still arrives in one chunk.
        c.send(CMD_FLAG_DF, CMD_READ, 2, 1 << 20, 65536, &[]);
        let r = c.reply(0);
        assert!(!r.hole && r.data.iter().all(|b| *b == 1));
        c.send(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 3, 0, 4 << 20, &[]);
        let mut hb = [0u8; 32];
        let hl = if extended { 32 } else { 20 };
        c.s.read_exact(&mut hb[..hl]).unwrap();
        let ReplyHeader::Chunk {
            chunk_type, length, ..
        } = ReplyHeader::decode(&hb[..hl]).unwrap()
        else {
            panic!("block status needs a chunk")
        };
        let mut p = vec![0u8; length as usize];
        c.s.read_exact(&mut p).unwrap();
        let ChunkPayload::BlockStatus { extents, wide, .. } =
            ChunkPayload::decode(chunk_type, &p, length).unwrap()
        else {
            panic!("not block status")
        };
        assert_eq!(wide, extended);
        assert_eq!(extents.len(), 1, "REQ_ONE");
        assert_eq!(extents[0].flags, STATE_HOLE | STATE_ZERO);
        assert!(extents[0].length <= 1 << 20);
    }
}
