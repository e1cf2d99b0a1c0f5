//! The live-migration wire protocol between two agents, version 3.
//!
//! Pure: no I/O. The async/threaded shells in `sender` and `receiver` read a 16-byte
//! header, check its declared length against the per-command limit, read exactly that
//! many payload bytes and only then call [`Message::decode`]. A parser therefore never
//! sees a partial frame, never panics and never allocates more than
//! [`MAX_PAYLOAD`] (plus the bounded decompression buffer) per frame.
//!
//! # Framing
//!
//! Every frame, in both directions, is a header followed by `length` payload bytes:
//!
//! ```text
//! 0      2      4          8                 16
//! | cmd  | flags| reserved |  length (u64 LE) |  payload ...
//! ```
//!
//! `cmd` is a [`Command`] (`u16` LE; 0 is `Invalid` so a zeroed buffer never parses as
//! a real command), `flags` says how a `Memory` payload is compressed, `reserved` must
//! be zero. All integers are little endian.
//!
//! # Connections and message sequence
//!
//! The sender (source agent) opens one control connection and `streams - 1` data
//! connections to the receiver's `--migration-listen` address. Every connection starts
//! with mutual authentication; the token (or ticket secret) never crosses the wire:
//!
//! ```text
//! receiver -> Challenge{version_min, version_max, nonce_r}
//! sender   -> Hello{version, auth (token | ticket id), nonce_s,
//!                   proof_s = BLAKE3-keyed(key, "sender" | nonce_r | nonce_s)}
//! receiver -> Ok{proof_r = BLAKE3-keyed(key, "receiver" | nonce_r | nonce_s)}   (or Error)
//! ```
//!
//! `key` is `blake3::derive_key(AUTH_CONTEXT, token)` (or of the ticket secret). The
//! sender checks `proof_r` too, so guest memory never goes to a peer without the key.
//!
//! Control connection, after authentication:
//!
//! ```text
//! sender   -> Config{chunk_size, streams, switchover mode, switchover timeout, VmSpec (JSON)}
//! receiver -> Ok{session id}        (memory size, vCPUs and CPUID checked, VM created)
//!   repeated, one round per pass (pass 0 = all non-zero pages, then dirty pages):
//! sender   -> Memory{ranges, bytes}* | Sparse{pages}*  (on any connection of the session)
//! sender   -> Sync{pass}                       (on every connection)
//! receiver -> Ok                               (per connection: all its Memory applied)
//!   stop and copy (source paused):
//! sender   -> Memory*, Sync, <- Ok             (the last dirty pages)
//! sender   -> State{opaque VMM state}          <- Ok
//! sender   -> Digests{chunk_size, BLAKE3 per chunk}
//! receiver -> Ok | Error(digest_mismatch)      (target memory == source paused image)
//!   switchover "coordinated" only (the source waits for the coordinator's go-ahead):
//! sender   -> Switchover{disks: URI + lease}     (new lease tokens, one per VM disk)
//! receiver -> Ok                                (MigrationTarget::set_disks done)
//!   both modes:
//! sender   -> Complete
//! receiver -> Ok                               (state restored, guest running)
//! ```
//!
//! Switchover modes (`Config.switchover`): in `auto` the sender goes from Digests
//! straight to Complete and the target opens the spec's disks at resume (the source has
//! paused and drained them). In `coordinated` the source stays paused ("quiesced") after
//! Digests until the coordinator has fenced the disks to the target and gives the
//! go-ahead with the new URIs; the receiver refuses `Complete` before `Switchover` and
//! `Switchover` in auto mode, so the target never opens a disk with the source's lease
//! and never resumes before the go-ahead. While it waits for `Switchover` the receiver
//! allows the sender `switchover_timeout_s` (from Config) plus the usual I/O timeout of
//! silence on the control connection.
//!
//! `Sparse` carries pages that are zero except for a few 64-bit words (at most
//! [`MAX_SPARSE_WORDS`]): `{gpa, [(word index, value)]}` per page, about 10 bytes per
//! word instead of 4 KiB per page. A guest that dirties a byte or two per page (counters,
//! flags, the A-B sweeper) costs almost nothing on the wire; the receiver writes the
//! whole page (zeros plus the words), so the result is the same as a Memory frame.
//!
//! Data connection: `Join{session id}` <- `Ok`, then `Memory*`, `Sparse*` and `Sync` as
//! above.
//! `Abandon{reason}` may be sent at any time on the control connection; the receiver
//! discards the incoming VM. A closed control connection before `Complete` means the
//! same. Any frame out of sequence is answered with `Error` and the session is
//! abandoned (see `receiver::ReceiverState`).
//!
//! Versioning: a receiver accepts the versions in `[MIN_VERSION, VERSION]` and says so
//! in its challenge; the sender picks the highest it also speaks. Version 3 carries each
//! disk's lease token in its own field (Switchover and the spec's disks) instead of in
//! the URI; version-2 peers are refused. Version 2 added the
//! switchover mode and timeout to Config and the Switchover message; version 1 peers
//! are refused (a version-1 receiver would resume without waiting for the go-ahead).

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::contract::{DiskSpec, PAGE_SIZE, VmSpec};
use stagehand_common::secret::Secret;

/// The protocol version this build speaks.
pub const VERSION: u16 = 3;
/// The oldest version this build still accepts as a receiver.
pub const MIN_VERSION: u16 = 3;
/// Size of a frame header.
pub const HEADER_LEN: usize = 16;
/// Largest payload of any frame (a Memory frame carries at most one 2 MiB chunk plus
/// its range table; State and Config are far smaller). Bigger frames are refused
/// before any allocation.
pub const MAX_PAYLOAD: u64 = 64 << 20;
/// Largest number of ranges in one Memory frame (one per page of a 2 MiB chunk ×4).
pub const MAX_RANGES: usize = 4096;
/// Largest number of chunk digests (64 TiB of guest memory at 2 MiB chunks).
pub const MAX_DIGESTS: usize = 1 << 25;
/// Context string for deriving the authentication key from a token or ticket.
pub const AUTH_CONTEXT: &str = "stagehand 2026 live-migration auth v1";
/// Most disks a Switchover message may carry, and the longest URI in it.
pub const MAX_DISKS: usize = 64;
pub const MAX_URI_LEN: usize = 4096;
/// Most non-zero 64-bit words a page may have to travel as a Sparse page (then it costs
/// at most 2 + 32 × 10 bytes instead of 4096), and most pages in one Sparse frame.
pub const MAX_SPARSE_WORDS: usize = 32;
pub const MAX_SPARSE_PAGES: usize = 4096;
/// Words per page.
pub const PAGE_WORDS: usize = (PAGE_SIZE / 8) as usize;
/// Length of nonces, proofs, session ids and ticket ids.
pub const NONCE_LEN: usize = 32;
pub const ID_LEN: usize = 16;

/// Frame commands. `Invalid = 0` so that zeroed memory is never a valid command.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Invalid = 0,
    Challenge = 1,
    Hello = 2,
    Config = 3,
    Join = 4,
    Memory = 5,
    Sync = 6,
    State = 7,
    Digests = 8,
    Complete = 9,
    Abandon = 10,
    Ok = 11,
    Error = 12,
    Switchover = 13,
    Sparse = 14,
}

impl Command {
    pub fn from_u16(v: u16) -> Command {
        match v {
            1 => Command::Challenge,
            2 => Command::Hello,
            3 => Command::Config,
            4 => Command::Join,
            5 => Command::Memory,
            6 => Command::Sync,
            7 => Command::State,
            8 => Command::Digests,
            9 => Command::Complete,
            10 => Command::Abandon,
            11 => Command::Ok,
            12 => Command::Error,
            13 => Command::Switchover,
            14 => Command::Sparse,
            _ => Command::Invalid,
        }
    }

    /// The largest payload this command may carry; a header declaring more is refused.
    pub fn max_payload(self) -> u64 {
        match self {
            Command::Invalid => 0,
            Command::Challenge => 4 + NONCE_LEN as u64,
            Command::Hello => 2 + 1 + (ID_LEN + 2 * NONCE_LEN) as u64,
            Command::Config => 1 << 20,
            Command::Switchover => 4 + (MAX_DISKS * 2 * (4 + MAX_URI_LEN)) as u64,
            Command::Sparse => 4 + (MAX_SPARSE_PAGES * (10 + MAX_SPARSE_WORDS * 10)) as u64,
            Command::Join => ID_LEN as u64,
            Command::Sync => 4,
            Command::Complete => 0,
            Command::Abandon | Command::Error => 4096,
            Command::Ok => 4096,
            Command::Memory | Command::State => MAX_PAYLOAD,
            Command::Digests => 12 + (MAX_DIGESTS as u64) * 32,
        }
    }
}

/// How a Memory payload is compressed (the frame's `flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Zstd,
}

impl Compression {
    fn flag(self) -> u16 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd => 2,
        }
    }
    fn from_flag(f: u16) -> Result<Self, ProtocolError> {
        match f {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Lz4),
            2 => Ok(Compression::Zstd),
            other => Err(ProtocolError::BadFlags(other)),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        })
    }
}

/// When the source hands the guest over (`switchover` of the migrate request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SwitchoverMode {
    /// As soon as the target verified the memory (the target opens the spec's disks).
    #[default]
    Auto,
    /// Only after the coordinator's go-ahead, with the disk URIs it gives.
    Coordinated,
}

impl SwitchoverMode {
    fn byte(self) -> u8 {
        match self {
            SwitchoverMode::Auto => 0,
            SwitchoverMode::Coordinated => 1,
        }
    }
    fn from_byte(b: u8) -> Result<Self, ProtocolError> {
        match b {
            0 => Ok(SwitchoverMode::Auto),
            1 => Ok(SwitchoverMode::Coordinated),
            other => Err(ProtocolError::BadMode(other)),
        }
    }
}

/// Errors from decoding. Each is a sentence naming what the peer got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("frame for {cmd:?} declares {len} payload bytes, more than its limit {max}")]
    TooLong { cmd: Command, len: u64, max: u64 },
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("unknown frame flags {0:#x}")]
    BadFlags(u16),
    #[error("{0:?} payload is truncated or has trailing bytes")]
    BadLength(Command),
    #[error("memory range {gpa:#x}+{len:#x} is not page aligned or overflows")]
    BadRange { gpa: u64, len: u64 },
    #[error("memory frame has {0} ranges, more than allowed")]
    TooManyRanges(usize),
    #[error("compressed memory payload is corrupt: {0}")]
    Decompress(String),
    #[error("VM configuration is not valid JSON: {0}")]
    BadConfig(String),
    #[error("text field is not UTF-8")]
    BadText,
    #[error("unknown switchover mode {0}")]
    BadMode(u8),
    #[error("switchover carries {0} disks, more than allowed")]
    TooManyDisks(usize),
    #[error("a disk URI is empty or longer than allowed")]
    BadUri,
    #[error(
        "sparse page {gpa:#x} is not page aligned, has too many words or unordered word indices"
    )]
    BadSparse { gpa: u64 },
}

/// A parsed header. Whole frames are only decoded once `length` bytes are present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub cmd: Command,
    pub flags: u16,
    pub length: u64,
}

impl FrameHeader {
    /// Parses and checks a header: known command, zero reserved bytes, length within
    /// the command's limit. After this, the shell may allocate `length` bytes.
    pub fn parse(buf: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let raw_cmd = u16::from_le_bytes([buf[0], buf[1]]);
        let cmd = Command::from_u16(raw_cmd);
        if cmd == Command::Invalid {
            return Err(ProtocolError::UnknownCommand(raw_cmd));
        }
        let flags = u16::from_le_bytes([buf[2], buf[3]]);
        if buf[4..8] != [0, 0, 0, 0] {
            return Err(ProtocolError::Reserved);
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&buf[8..16]);
        let length = u64::from_le_bytes(len);
        let max = cmd.max_payload();
        if length > max {
            return Err(ProtocolError::TooLong {
                cmd,
                len: length,
                max,
            });
        }
        if cmd != Command::Memory && flags != 0 {
            return Err(ProtocolError::BadFlags(flags));
        }
        Compression::from_flag(flags)?;
        Ok(FrameHeader { cmd, flags, length })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&(self.cmd as u16).to_le_bytes());
        b[2..4].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.length.to_le_bytes());
        b
    }
}

/// How a sender authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// Proof made with the cluster token (`--api-token`).
    Token,
    /// Proof made with the secret of a one-time ticket the receiver issued.
    Ticket([u8; ID_LEN]),
}

/// A page that is zero except for `words` (`(index of the u64 in the page, value)`,
/// indices strictly increasing), carried by a Sparse frame.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SparsePage {
    pub gpa: u64,
    pub words: Vec<(u16, u64)>,
}

impl SparsePage {
    /// The page's non-zero words if there are at most `MAX_SPARSE_WORDS`, else None
    /// (stops reading at the first word past the limit, so dense pages cost little).
    pub fn encode(gpa: u64, page: &[u8]) -> Option<SparsePage> {
        let mut words = Vec::new();
        for (i, w) in page.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            let v = u64::from_le_bytes(a);
            if v != 0 {
                if words.len() == MAX_SPARSE_WORDS {
                    return None;
                }
                words.push((i as u16, v));
            }
        }
        Some(SparsePage { gpa, words })
    }

    /// Writes the page's bytes (zeros plus its words) into `out` (one page long).
    pub fn expand_into(&self, out: &mut [u8]) {
        out.fill(0);
        for &(i, v) in &self.words {
            let o = usize::from(i) * 8;
            out[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
    }

    fn wire_len(&self) -> usize {
        10 + 10 * self.words.len()
    }
}

/// A `{gpa, len}` run of guest memory carried by a Memory frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRange {
    pub gpa: u64,
    pub len: u64,
}

/// Error codes carried by Error frames (stable; tests and the API match on them).
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Internal = 1,
    Protocol = 2,
    AuthFailed = 3,
    Version = 4,
    Incompatible = 5,
    DigestMismatch = 6,
    RestoreFailed = 7,
    Exists = 8,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            2 => ErrorCode::Protocol,
            3 => ErrorCode::AuthFailed,
            4 => ErrorCode::Version,
            5 => ErrorCode::Incompatible,
            6 => ErrorCode::DigestMismatch,
            7 => ErrorCode::RestoreFailed,
            8 => ErrorCode::Exists,
            _ => ErrorCode::Internal,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Internal => "internal",
            ErrorCode::Protocol => "protocol",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::Version => "version",
            ErrorCode::Incompatible => "incompatible",
            ErrorCode::DigestMismatch => "digest_mismatch",
            ErrorCode::RestoreFailed => "restore_failed",
            ErrorCode::Exists => "exists",
        }
    }
}

/// Every message of the protocol, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Challenge {
        version_min: u16,
        version_max: u16,
        nonce: [u8; NONCE_LEN],
    },
    Hello {
        version: u16,
        auth: AuthKind,
        nonce: [u8; NONCE_LEN],
        proof: [u8; NONCE_LEN],
    },
    Config {
        chunk_size: u64,
        streams: u16,
        switchover: SwitchoverMode,
        /// How long the source waits for the go-ahead (coordinated mode), seconds.
        switchover_timeout_s: u32,
        spec: VmSpec,
    },
    Join {
        session: [u8; ID_LEN],
    },
    /// Page runs and their bytes (decompressed), concatenated in range order.
    Memory {
        ranges: Vec<MemRange>,
        data: Vec<u8>,
    },
    Sync {
        pass: u32,
    },
    State {
        state: Vec<u8>,
    },
    Digests {
        chunk_size: u64,
        digests: Vec<[u8; 32]>,
    },
    /// Pages that are zero but for a few words.
    Sparse {
        pages: Vec<SparsePage>,
    },
    /// The coordinator's go-ahead: the disks (URI and lease) the target opens
    /// (coordinated mode).
    Switchover {
        disks: Vec<DiskSpec>,
    },
    Complete,
    Abandon {
        reason: String,
    },
    Ok {
        payload: Vec<u8>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Small bounds-checked little-endian reader over a payload.
struct Reader<'a> {
    buf: &'a [u8],
    cmd: Command,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::BadLength(self.cmd));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn end(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::BadLength(self.cmd))
        }
    }
}

fn text(b: &[u8]) -> Result<String, ProtocolError> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::BadText)
}

/// Truncates a text field to what its frame may carry, on a char boundary.
fn bounded_text(s: &str, max: usize) -> &[u8] {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

impl Message {
    pub fn command(&self) -> Command {
        match self {
            Message::Challenge { .. } => Command::Challenge,
            Message::Hello { .. } => Command::Hello,
            Message::Config { .. } => Command::Config,
            Message::Join { .. } => Command::Join,
            Message::Memory { .. } => Command::Memory,
            Message::Sync { .. } => Command::Sync,
            Message::State { .. } => Command::State,
            Message::Digests { .. } => Command::Digests,
            Message::Switchover { .. } => Command::Switchover,
            Message::Sparse { .. } => Command::Sparse,
            Message::Complete => Command::Complete,
            Message::Abandon { .. } => Command::Abandon,
            Message::Ok { .. } => Command::Ok,
            Message::Error { .. } => Command::Error,
        }
    }

    /// Encodes a whole frame (header + payload). Memory payloads are compressed with
    /// `compression`; other messages ignore it.
    pub fn encode(&self, compression: Compression) -> Vec<u8> {
        let mut p = Vec::new();
        let mut flags = 0u16;
        match self {
            Message::Challenge {
                version_min,
                version_max,
                nonce,
            } => {
                p.extend_from_slice(&version_min.to_le_bytes());
                p.extend_from_slice(&version_max.to_le_bytes());
                p.extend_from_slice(nonce);
            }
            Message::Hello {
                version,
                auth,
                nonce,
                proof,
            } => {
                p.extend_from_slice(&version.to_le_bytes());
                match auth {
                    AuthKind::Token => {
                        p.push(1);
                        p.extend_from_slice(&[0u8; ID_LEN]);
                    }
                    AuthKind::Ticket(id) => {
                        p.push(2);
                        p.extend_from_slice(id);
                    }
                }
                p.extend_from_slice(nonce);
                p.extend_from_slice(proof);
            }
            Message::Config {
                chunk_size,
                streams,
                switchover,
                switchover_timeout_s,
                spec,
            } => {
                p.extend_from_slice(&chunk_size.to_le_bytes());
                p.extend_from_slice(&streams.to_le_bytes());
                p.push(switchover.byte());
                p.extend_from_slice(&switchover_timeout_s.to_le_bytes());
                let json = serde_json::to_vec(spec).expect("VmSpec serializes to JSON");
                p.extend_from_slice(&json);
            }
            Message::Join { session } => p.extend_from_slice(session),
            Message::Memory { ranges, data } => {
                let mut raw = Vec::with_capacity(4 + ranges.len() * 16 + data.len());
                raw.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
                for r in ranges {
                    raw.extend_from_slice(&r.gpa.to_le_bytes());
                    raw.extend_from_slice(&r.len.to_le_bytes());
                }
                raw.extend_from_slice(data);
                flags = compression.flag();
                p = compress(compression, raw);
            }
            Message::Sync { pass } => p.extend_from_slice(&pass.to_le_bytes()),
            Message::State { state } => p.extend_from_slice(state),
            Message::Digests {
                chunk_size,
                digests,
            } => {
                p.extend_from_slice(&chunk_size.to_le_bytes());
                p.extend_from_slice(&(digests.len() as u32).to_le_bytes());
                for d in digests {
                    p.extend_from_slice(d);
                }
            }
            Message::Sparse { pages } => {
                p.reserve(4 + pages.iter().map(SparsePage::wire_len).sum::<usize>());
                p.extend_from_slice(&(pages.len() as u32).to_le_bytes());
                for pg in pages {
                    p.extend_from_slice(&pg.gpa.to_le_bytes());
                    p.extend_from_slice(&(pg.words.len() as u16).to_le_bytes());
                    for (i, v) in &pg.words {
                        p.extend_from_slice(&i.to_le_bytes());
                        p.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
            Message::Switchover { disks } => {
                // The sender checked count and lengths (service::switchover); a longer
                // list would be refused by the receiver, never silently cut.
                // Per disk: the URI, then the lease (length 0: none).
                p.extend_from_slice(&(disks.len() as u32).to_le_bytes());
                for d in disks {
                    p.extend_from_slice(&(d.nbd.len() as u32).to_le_bytes());
                    p.extend_from_slice(d.nbd.as_bytes());
                    let lease = d.lease.as_ref().map_or("", |l| l.expose());
                    p.extend_from_slice(&(lease.len() as u32).to_le_bytes());
                    p.extend_from_slice(lease.as_bytes());
                }
            }
            Message::Complete => {}
            Message::Abandon { reason } => p.extend_from_slice(bounded_text(reason, 4096)),
            Message::Ok { payload } => p.extend_from_slice(payload),
            Message::Error { code, message } => {
                p.extend_from_slice(&(*code as u16).to_le_bytes());
                p.extend_from_slice(bounded_text(message, 4094));
            }
        }
        let header = FrameHeader {
            cmd: self.command(),
            flags,
            length: p.len() as u64,
        };
        let mut out = Vec::with_capacity(HEADER_LEN + p.len());
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(&p);
        out
    }

    /// Decodes a payload whose header was accepted by [`FrameHeader::parse`] and whose
    /// `length` bytes were all read.
    pub fn decode(h: &FrameHeader, payload: &[u8]) -> Result<Message, ProtocolError> {
        if payload.len() as u64 != h.length {
            return Err(ProtocolError::BadLength(h.cmd));
        }
        let mut r = Reader {
            buf: payload,
            cmd: h.cmd,
        };
        let msg = match h.cmd {
            Command::Invalid => return Err(ProtocolError::UnknownCommand(0)),
            Command::Challenge => Message::Challenge {
                version_min: r.u16()?,
                version_max: r.u16()?,
                nonce: r.array()?,
            },
            Command::Hello => {
                let version = r.u16()?;
                let kind = r.u8()?;
                let id: [u8; ID_LEN] = r.array()?;
                let auth = match kind {
                    1 => AuthKind::Token,
                    2 => AuthKind::Ticket(id),
                    _ => return Err(ProtocolError::BadLength(h.cmd)),
                };
                Message::Hello {
                    version,
                    auth,
                    nonce: r.array()?,
                    proof: r.array()?,
                }
            }
            Command::Config => {
                let chunk_size = r.u64()?;
                let streams = r.u16()?;
                let switchover = SwitchoverMode::from_byte(r.u8()?)?;
                let switchover_timeout_s = r.u32()?;
                let spec = serde_json::from_slice(r.rest())
                    .map_err(|e| ProtocolError::BadConfig(e.to_string()))?;
                Message::Config {
                    chunk_size,
                    streams,
                    switchover,
                    switchover_timeout_s,
                    spec,
                }
            }
            Command::Sparse => {
                let mut pages = Vec::new();
                walk_sparse(r.rest(), |gpa, words| {
                    pages.push(SparsePage {
                        gpa,
                        words: words.to_vec(),
                    })
                })?;
                Message::Sparse { pages }
            }
            Command::Switchover => {
                let n = r.u32()? as usize;
                if n > MAX_DISKS {
                    return Err(ProtocolError::TooManyDisks(n));
                }
                let mut disks = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = r.u32()? as usize;
                    if len == 0 || len > MAX_URI_LEN {
                        return Err(ProtocolError::BadUri);
                    }
                    let nbd = text(r.take(len)?)?;
                    let len = r.u32()? as usize;
                    if len > MAX_URI_LEN {
                        return Err(ProtocolError::BadUri);
                    }
                    let lease = match text(r.take(len)?)? {
                        t if t.is_empty() => None,
                        t => Some(Secret::new(t).map_err(|_| ProtocolError::BadUri)?),
                    };
                    disks.push(DiskSpec { nbd, lease });
                }
                Message::Switchover { disks }
            }
            Command::Join => Message::Join {
                session: r.array()?,
            },
            Command::Memory => {
                let raw = decompress(Compression::from_flag(h.flags)?, payload)?;
                return decode_memory(&raw);
            }
            Command::Sync => Message::Sync { pass: r.u32()? },
            Command::State => Message::State {
                state: r.rest().to_vec(),
            },
            Command::Digests => {
                let chunk_size = r.u64()?;
                let n = r.u32()? as usize;
                if n > MAX_DIGESTS || r.buf.len() != n * 32 {
                    return Err(ProtocolError::BadLength(h.cmd));
                }
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    digests.push(r.array()?);
                }
                Message::Digests {
                    chunk_size,
                    digests,
                }
            }
            Command::Complete => Message::Complete,
            Command::Abandon => Message::Abandon {
                reason: text(r.rest())?,
            },
            Command::Ok => Message::Ok {
                payload: r.rest().to_vec(),
            },
            Command::Error => {
                let code = ErrorCode::from_u16(r.u16()?);
                Message::Error {
                    code,
                    message: text(r.rest())?,
                }
            }
        };
        r.end()?;
        Ok(msg)
    }
}

fn decode_memory(raw: &[u8]) -> Result<Message, ProtocolError> {
    let (ranges, data) = parse_memory_raw(raw)?;
    Ok(Message::Memory {
        ranges,
        data: data.to_vec(),
    })
}

/// Parses an uncompressed Memory payload without copying its page bytes.
fn parse_memory_raw(raw: &[u8]) -> Result<(Vec<MemRange>, &[u8]), ProtocolError> {
    let mut r = Reader {
        buf: raw,
        cmd: Command::Memory,
    };
    let n = r.u32()? as usize;
    if n > MAX_RANGES {
        return Err(ProtocolError::TooManyRanges(n));
    }
    let mut ranges = Vec::with_capacity(n);
    let mut total: u64 = 0;
    for _ in 0..n {
        let gpa = r.u64()?;
        let len = r.u64()?;
        if len == 0
            || !gpa.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || gpa.checked_add(len).is_none()
        {
            return Err(ProtocolError::BadRange { gpa, len });
        }
        total = total
            .checked_add(len)
            .ok_or(ProtocolError::BadRange { gpa, len })?;
        ranges.push(MemRange { gpa, len });
    }
    if r.buf.len() as u64 != total {
        return Err(ProtocolError::BadLength(Command::Memory));
    }
    Ok((ranges, r.rest()))
}

/// The receiver's fast path for Memory frames: ranges plus the page bytes, borrowed
/// from `payload` (or from `decompressed`, which holds the decompressed payload).
pub fn parse_memory<'a>(
    h: &FrameHeader,
    payload: &'a [u8],
    decompressed: &'a mut Vec<u8>,
) -> Result<(Vec<MemRange>, &'a [u8]), ProtocolError> {
    if h.cmd != Command::Memory || payload.len() as u64 != h.length {
        return Err(ProtocolError::BadLength(h.cmd));
    }
    match Compression::from_flag(h.flags)? {
        Compression::None => parse_memory_raw(payload),
        c => {
            *decompressed = decompress(c, payload)?;
            parse_memory_raw(decompressed)
        }
    }
}

/// The receiver's fast path for Sparse frames: checks the whole frame as `decode`
/// does, then calls `page(gpa, words)` for each page in frame order, without
/// allocating (a frame of a chunk of counters is 512 small pages; decoding it into
/// vectors cost the receiver more than writing the pages).
pub fn parse_sparse(
    h: &FrameHeader,
    payload: &[u8],
    page: impl FnMut(u64, &[(u16, u64)]),
) -> Result<(), ProtocolError> {
    if h.cmd != Command::Sparse || payload.len() as u64 != h.length {
        return Err(ProtocolError::BadLength(h.cmd));
    }
    walk_sparse(payload, |_, _| {})?;
    walk_sparse(payload, page)
}

/// Parses a Sparse payload, calling `page` for each page as it is read (so a frame
/// that fails half-way has already been partly visited: check first, see above).
fn walk_sparse(
    payload: &[u8],
    mut page: impl FnMut(u64, &[(u16, u64)]),
) -> Result<(), ProtocolError> {
    let mut r = Reader {
        buf: payload,
        cmd: Command::Sparse,
    };
    let n = r.u32()? as usize;
    if n > MAX_SPARSE_PAGES {
        return Err(ProtocolError::TooManyRanges(n));
    }
    let mut words = [(0u16, 0u64); MAX_SPARSE_WORDS];
    for _ in 0..n {
        let gpa = r.u64()?;
        let nw = usize::from(r.u16()?);
        if !gpa.is_multiple_of(PAGE_SIZE) || nw > MAX_SPARSE_WORDS {
            return Err(ProtocolError::BadSparse { gpa });
        }
        for k in 0..nw {
            let i = r.u16()?;
            let v = r.u64()?;
            // Canonical only (increasing indices, non-zero values): the target hashes
            // these encodings as they are (`digest`).
            if usize::from(i) >= PAGE_WORDS || v == 0 || (k > 0 && words[k - 1].0 >= i) {
                return Err(ProtocolError::BadSparse { gpa });
            }
            words[k] = (i, v);
        }
        page(gpa, &words[..nw]);
    }
    r.end()
}

/// Builds an (uncompressed) Sparse frame page by page in a reusable buffer: the same
/// bytes as `Message::Sparse { pages }.encode(Compression::None)`, without a vector per
/// page (the sender's chunk of counters is 512 of them).
#[derive(Debug, Default)]
pub struct SparseFrame {
    buf: Vec<u8>,
    pages: u32,
}

impl SparseFrame {
    /// Empties the frame, keeping its buffer.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.buf.resize(HEADER_LEN + 4, 0);
        self.pages = 0;
    }

    /// Adds a page: `words` as `PageScan::Sparse` gives them (canonical).
    pub fn push(&mut self, gpa: u64, words: &[(u16, u64)]) {
        if self.buf.len() < HEADER_LEN + 4 {
            self.clear();
        }
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf
            .extend_from_slice(&(words.len() as u16).to_le_bytes());
        for (i, v) in words {
            self.buf.extend_from_slice(&i.to_le_bytes());
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
        self.pages += 1;
    }

    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// The whole frame (header included), ready to send.
    pub fn finish(&mut self) -> &[u8] {
        if self.buf.len() < HEADER_LEN + 4 {
            self.clear();
        }
        let header = FrameHeader {
            cmd: Command::Sparse,
            flags: 0,
            length: (self.buf.len() - HEADER_LEN) as u64,
        }
        .encode();
        self.buf[..HEADER_LEN].copy_from_slice(&header);
        self.buf[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&self.pages.to_le_bytes());
        &self.buf
    }
}

/// Header and range table of an uncompressed Memory frame whose page bytes (`data_len`
/// of them, in range order) the caller writes right after, straight from its buffer.
pub fn memory_frame_prefix(ranges: &[MemRange], data_len: u64) -> Vec<u8> {
    let table = 4 + 16 * ranges.len() as u64;
    let mut out = Vec::with_capacity(HEADER_LEN + table as usize);
    out.extend_from_slice(
        &FrameHeader {
            cmd: Command::Memory,
            flags: 0,
            length: table + data_len,
        }
        .encode(),
    );
    out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for r in ranges {
        out.extend_from_slice(&r.gpa.to_le_bytes());
        out.extend_from_slice(&r.len.to_le_bytes());
    }
    out
}

/// Compressed payloads start with the uncompressed length (u32 LE) so the receiver can
/// refuse an oversized one before decompressing.
fn compress(c: Compression, raw: Vec<u8>) -> Vec<u8> {
    match c {
        Compression::None => raw,
        Compression::Lz4 => {
            let mut out = (raw.len() as u32).to_le_bytes().to_vec();
            out.extend_from_slice(&lz4_flex::block::compress(&raw));
            out
        }
        Compression::Zstd => {
            let mut out = (raw.len() as u32).to_le_bytes().to_vec();
            let z = zstd::bulk::compress(&raw, 1).expect("zstd compresses into a growable Vec");
            out.extend_from_slice(&z);
            out
        }
    }
}

fn decompress(c: Compression, payload: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let raw_len = |p: &[u8]| -> Result<usize, ProtocolError> {
        if p.len() < 4 {
            return Err(ProtocolError::BadLength(Command::Memory));
        }
        let n = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as u64;
        if n > MAX_PAYLOAD {
            return Err(ProtocolError::TooLong {
                cmd: Command::Memory,
                len: n,
                max: MAX_PAYLOAD,
            });
        }
        Ok(n as usize)
    };
    let out = match c {
        Compression::None => return Ok(payload.to_vec()),
        Compression::Lz4 => {
            let n = raw_len(payload)?;
            let out = lz4_flex::block::decompress(&payload[4..], n)
                .map_err(|e| ProtocolError::Decompress(e.to_string()))?;
            (n, out)
        }
        Compression::Zstd => {
            let n = raw_len(payload)?;
            let out = zstd::bulk::decompress(&payload[4..], n)
                .map_err(|e| ProtocolError::Decompress(e.to_string()))?;
            (n, out)
        }
    };
    if out.1.len() != out.0 {
        return Err(ProtocolError::Decompress(
            "length differs from the declared one".into(),
        ));
    }
    Ok(out.1)
}

/// Authentication helpers: keyed BLAKE3 proofs over both nonces, never the key itself.
pub mod auth {
    use super::{AUTH_CONTEXT, NONCE_LEN};

    /// The 32-byte key both peers derive from a shared secret (token or ticket).
    pub fn derive_key(secret: &[u8]) -> [u8; 32] {
        blake3::derive_key(AUTH_CONTEXT, secret)
    }

    fn proof(
        key: &[u8; 32],
        role: &[u8],
        nonce_r: &[u8; NONCE_LEN],
        nonce_s: &[u8; NONCE_LEN],
    ) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(role);
        h.update(nonce_r);
        h.update(nonce_s);
        h.finalize()
    }

    pub fn sender_proof(
        key: &[u8; 32],
        nonce_r: &[u8; NONCE_LEN],
        nonce_s: &[u8; NONCE_LEN],
    ) -> [u8; 32] {
        *proof(key, b"sender", nonce_r, nonce_s).as_bytes()
    }

    pub fn receiver_proof(
        key: &[u8; 32],
        nonce_r: &[u8; NONCE_LEN],
        nonce_s: &[u8; NONCE_LEN],
    ) -> [u8; 32] {
        *proof(key, b"receiver", nonce_r, nonce_s).as_bytes()
    }

    /// Constant-time check (blake3::Hash equality is constant time).
    pub fn verify(expected: [u8; 32], got: &[u8]) -> bool {
        let Ok(got) = <[u8; 32]>::try_from(got) else {
            return false;
        };
        blake3::Hash::from(expected) == blake3::Hash::from(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::BootSpec;
    use proptest::prelude::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "vm7".into(),
            memory_mib: 150,
            vcpus: 1,
            boot: BootSpec {
                flat_binary: "/x/ab.bin".into(),
                load_addr: 0x7c00,
            },
            disks: vec![],
            cpuid: vec![[0, 0, 0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]],
        }
    }

    fn roundtrip(m: &Message, c: Compression) -> Message {
        let bytes = m.encode(c);
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&bytes[..HEADER_LEN]);
        let h = FrameHeader::parse(&hdr).expect("header parses");
        assert_eq!(h.length as usize, bytes.len() - HEADER_LEN);
        Message::decode(&h, &bytes[HEADER_LEN..]).expect("payload decodes")
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Challenge {
                version_min: 1,
                version_max: 1,
                nonce: [7; 32],
            },
            Message::Hello {
                version: 1,
                auth: AuthKind::Token,
                nonce: [1; 32],
                proof: [2; 32],
            },
            Message::Hello {
                version: 1,
                auth: AuthKind::Ticket([9; 16]),
                nonce: [1; 32],
                proof: [2; 32],
            },
            Message::Config {
                chunk_size: 2 << 20,
                streams: 4,
                switchover: SwitchoverMode::Auto,
                switchover_timeout_s: 30,
                spec: spec(),
            },
            Message::Config {
                chunk_size: 2 << 20,
                streams: 1,
                switchover: SwitchoverMode::Coordinated,
                switchover_timeout_s: u32::MAX,
                spec: spec(),
            },
            Message::Sparse { pages: vec![] },
            Message::Sparse {
                pages: vec![
                    SparsePage {
                        gpa: 0x10_0000,
                        words: vec![(0, 0x42)],
                    },
                    SparsePage {
                        gpa: 0x20_0000,
                        words: vec![],
                    },
                    SparsePage {
                        gpa: 0x3000,
                        words: vec![(3, u64::MAX), (511, 1)],
                    },
                ],
            },
            Message::Switchover { disks: vec![] },
            Message::Switchover {
                disks: vec![
                    DiskSpec {
                        nbd: "nbd://10.0.0.2:10809/vm7-root".into(),
                        lease: Some(Secret::new("abc").expect("token")),
                    },
                    DiskSpec::plain("nbd+unix:///d2?socket=/run/s"),
                ],
            },
            Message::Join { session: [5; 16] },
            Message::Memory {
                ranges: vec![
                    MemRange {
                        gpa: 0x1000,
                        len: 0x2000,
                    },
                    MemRange {
                        gpa: 0x10_0000,
                        len: 0x1000,
                    },
                ],
                data: (0..0x3000u32).map(|i| (i % 251) as u8).collect(),
            },
            Message::Sync { pass: 3 },
            Message::State {
                state: vec![1, 2, 3, 4],
            },
            Message::Digests {
                chunk_size: 2 << 20,
                digests: vec![[3; 32], [4; 32]],
            },
            Message::Complete,
            Message::Abandon {
                reason: "cancelled by operator".into(),
            },
            Message::Ok { payload: vec![] },
            Message::Error {
                code: ErrorCode::DigestMismatch,
                message: "chunk 3 differs".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_with_every_compression() {
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            for m in samples() {
                assert_eq!(roundtrip(&m, c), m, "{c}");
            }
        }
    }

    #[test]
    fn compression_shrinks_repetitive_pages_and_sets_flag() {
        let m = Message::Memory {
            ranges: vec![MemRange {
                gpa: 0,
                len: 1 << 20,
            }],
            data: vec![1; 1 << 20],
        };
        for c in [Compression::Lz4, Compression::Zstd] {
            let b = m.encode(c);
            assert!(b.len() < 64 << 10, "{c}: {}", b.len());
            assert_eq!(u16::from_le_bytes([b[2], b[3]]), c.flag());
        }
    }

    #[test]
    fn header_rejects_zero_command_reserved_and_oversize() {
        let zero = [0u8; HEADER_LEN];
        assert_eq!(
            FrameHeader::parse(&zero),
            Err(ProtocolError::UnknownCommand(0))
        );
        let mut h = FrameHeader {
            cmd: Command::Sync,
            flags: 0,
            length: 4,
        }
        .encode();
        h[5] = 1;
        assert_eq!(FrameHeader::parse(&h), Err(ProtocolError::Reserved));
        let h = FrameHeader {
            cmd: Command::Memory,
            flags: 0,
            length: MAX_PAYLOAD + 1,
        }
        .encode();
        assert!(matches!(
            FrameHeader::parse(&h),
            Err(ProtocolError::TooLong { .. })
        ));
        let h = FrameHeader {
            cmd: Command::Sync,
            flags: 1,
            length: 4,
        }
        .encode();
        assert_eq!(FrameHeader::parse(&h), Err(ProtocolError::BadFlags(1)));
    }

    #[test]
    fn memory_ranges_must_be_aligned_and_match_data() {
        let bad = Message::Memory {
            ranges: vec![MemRange {
                gpa: 0x10,
                len: 0x1000,
            }],
            data: vec![0; 0x1000],
        };
        let b = bad.encode(Compression::None);
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&b[..HEADER_LEN]);
        let h = FrameHeader::parse(&hdr).expect("header ok");
        assert!(matches!(
            Message::decode(&h, &b[HEADER_LEN..]),
            Err(ProtocolError::BadRange { .. })
        ));
        // Data shorter than the ranges claim.
        let short = Message::Memory {
            ranges: vec![MemRange {
                gpa: 0,
                len: 0x2000,
            }],
            data: vec![0; 0x1000],
        };
        let b = short.encode(Compression::None);
        hdr.copy_from_slice(&b[..HEADER_LEN]);
        let h = FrameHeader::parse(&hdr).expect("header ok");
        assert_eq!(
            Message::decode(&h, &b[HEADER_LEN..]),
            Err(ProtocolError::BadLength(Command::Memory))
        );
    }

    #[test]
    fn prefix_plus_bytes_equals_encode_and_parses_without_copy() {
        let ranges = vec![
            MemRange {
                gpa: 0x2000,
                len: 0x1000,
            },
            MemRange {
                gpa: 0x8000,
                len: 0x2000,
            },
        ];
        let data: Vec<u8> = (0..0x3000u32).map(|i| (i * 7) as u8).collect();
        let mut frame = memory_frame_prefix(&ranges, data.len() as u64);
        frame.extend_from_slice(&data);
        let m = Message::Memory {
            ranges: ranges.clone(),
            data: data.clone(),
        };
        assert_eq!(frame, m.encode(Compression::None));
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let b = m.encode(c);
            let mut hdr = [0u8; HEADER_LEN];
            hdr.copy_from_slice(&b[..HEADER_LEN]);
            let h = FrameHeader::parse(&hdr).expect("header");
            let mut d = Vec::new();
            let (r, bytes) = parse_memory(&h, &b[HEADER_LEN..], &mut d).expect("parses");
            assert_eq!((r, bytes), (ranges.clone(), &data[..]));
        }
    }

    #[test]
    fn compressed_payload_declaring_huge_size_is_refused_before_allocating() {
        let mut p = u32::MAX.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; 16]);
        let h = FrameHeader {
            cmd: Command::Memory,
            flags: 1,
            length: p.len() as u64,
        };
        assert!(matches!(
            Message::decode(&h, &p),
            Err(ProtocolError::TooLong { .. })
        ));
    }

    #[test]
    fn auth_proofs_depend_on_key_role_and_nonces() {
        let k = auth::derive_key(b"cluster-token");
        let other = auth::derive_key(b"other-token");
        let (nr, ns) = ([1u8; 32], [2u8; 32]);
        let p = auth::sender_proof(&k, &nr, &ns);
        assert!(auth::verify(p, &auth::sender_proof(&k, &nr, &ns)));
        assert!(!auth::verify(p, &auth::sender_proof(&other, &nr, &ns)));
        assert!(!auth::verify(p, &auth::receiver_proof(&k, &nr, &ns)));
        assert!(!auth::verify(p, &auth::sender_proof(&k, &[3; 32], &ns)));
        assert!(!auth::verify(p, &p[..31]));
    }

    #[test]
    fn switchover_and_config_refuse_bad_fields() {
        let dec = |cmd: Command, p: &[u8]| {
            Message::decode(
                &FrameHeader {
                    cmd,
                    flags: 0,
                    length: p.len() as u64,
                },
                p,
            )
        };
        // More disks than allowed, an empty URI, a URI running past the payload.
        assert_eq!(
            dec(Command::Switchover, &(MAX_DISKS as u32 + 1).to_le_bytes()),
            Err(ProtocolError::TooManyDisks(MAX_DISKS + 1))
        );
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(dec(Command::Switchover, &p), Err(ProtocolError::BadUri));
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&10u32.to_le_bytes());
        p.extend_from_slice(b"short");
        assert_eq!(
            dec(Command::Switchover, &p),
            Err(ProtocolError::BadLength(Command::Switchover))
        );
        // A URI without its lease length.
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&5u32.to_le_bytes());
        p.extend_from_slice(b"nbd:/");
        assert_eq!(
            dec(Command::Switchover, &p),
            Err(ProtocolError::BadLength(Command::Switchover))
        );
        // An unknown switchover mode in Config.
        let mut b = Message::Config {
            chunk_size: 2 << 20,
            streams: 1,
            switchover: SwitchoverMode::Coordinated,
            switchover_timeout_s: 30,
            spec: spec(),
        }
        .encode(Compression::None);
        b[HEADER_LEN + 10] = 7;
        assert_eq!(
            dec(Command::Config, &b[HEADER_LEN..]),
            Err(ProtocolError::BadMode(7))
        );
    }

    #[test]
    fn sparse_refuses_unaligned_pages_bad_indices_and_too_many_words() {
        let frame = |pages: Vec<SparsePage>| {
            let b = Message::Sparse { pages }.encode(Compression::None);
            let mut hdr = [0u8; HEADER_LEN];
            hdr.copy_from_slice(&b[..HEADER_LEN]);
            let h = FrameHeader::parse(&hdr).expect("header");
            Message::decode(&h, &b[HEADER_LEN..])
        };
        let page = |gpa, words| SparsePage { gpa, words };
        assert!(frame(vec![page(0x10, vec![(0, 1)])]).is_err());
        assert!(frame(vec![page(0, vec![(512, 1)])]).is_err());
        assert!(frame(vec![page(0, vec![(5, 1), (5, 2)])]).is_err());
        assert!(frame(vec![page(0, vec![(6, 1), (5, 2)])]).is_err());
        // Not canonical: the target hashes the encodings as they come.
        assert!(frame(vec![page(0, vec![(5, 0)])]).is_err());
        let many: Vec<(u16, u64)> = (0..=MAX_SPARSE_WORDS as u16).map(|i| (i, 1)).collect();
        assert!(frame(vec![page(0, many)]).is_err());
        // The encoder never produces what the decoder refuses.
        let mut dense = vec![0u8; PAGE_SIZE as usize];
        for i in 0..=MAX_SPARSE_WORDS {
            dense[i * 8] = 1;
        }
        assert_eq!(SparsePage::encode(0, &dense), None);
        dense[MAX_SPARSE_WORDS * 8] = 0;
        let sp = SparsePage::encode(0x5000, &dense).expect("sparse enough");
        assert_eq!(sp.words.len(), MAX_SPARSE_WORDS);
        assert_eq!(
            frame(vec![sp.clone()]),
            Ok(Message::Sparse { pages: vec![sp] })
        );
    }

    /// A page with words at both ends and an all-zero page.
    fn two_sparse_pages() -> Vec<SparsePage> {
        vec![
            SparsePage {
                gpa: 0x1000,
                words: vec![(0, 7), (511, 9)],
            },
            SparsePage {
                gpa: 0x3000,
                words: vec![],
            },
        ]
    }

    #[test]
    fn sparse_frame_builder_writes_what_encode_writes() {
        let pages = two_sparse_pages();
        let mut f = SparseFrame::default();
        assert_eq!(
            f.finish(),
            &Message::Sparse { pages: vec![] }.encode(Compression::None)[..]
        );
        for _ in 0..2 {
            f.clear();
            for p in &pages {
                f.push(p.gpa, &p.words);
            }
            assert_eq!(f.pages(), 2);
            assert_eq!(
                f.finish(),
                &Message::Sparse {
                    pages: pages.clone()
                }
                .encode(Compression::None)[..]
            );
        }
    }

    #[test]
    fn parse_sparse_visits_what_decode_returns_and_refuses_the_same() {
        let raw = |pages: Vec<SparsePage>| {
            let b = Message::Sparse { pages }.encode(Compression::None);
            let mut hdr = [0u8; HEADER_LEN];
            hdr.copy_from_slice(&b[..HEADER_LEN]);
            (
                FrameHeader::parse(&hdr).expect("header"),
                b[HEADER_LEN..].to_vec(),
            )
        };
        let pages = two_sparse_pages();
        let (h, p) = raw(pages.clone());
        let mut seen = Vec::new();
        parse_sparse(&h, &p, |gpa, words| {
            seen.push(SparsePage {
                gpa,
                words: words.to_vec(),
            })
        })
        .expect("valid");
        assert_eq!(seen, pages);
        // A bad page late in the frame: nothing is visited at all.
        let mut bad = pages.clone();
        bad.push(SparsePage {
            gpa: 0x4000,
            words: vec![(3, 1), (2, 1)],
        });
        let (h, p) = raw(bad);
        let mut visited = 0;
        assert!(parse_sparse(&h, &p, |_, _| visited += 1).is_err());
        assert_eq!(visited, 0);
        assert!(Message::decode(&h, &p).is_err());
    }

    proptest! {
        #[test]
        fn sparse_pages_expand_to_the_page_they_encode(words in proptest::collection::btree_map(0usize..512, any::<u64>(), 0..40),
                                                        page_no in 0u64..1 << 20) {
            let mut page = vec![0u8; PAGE_SIZE as usize];
            for (i, v) in &words {
                page[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
            let nonzero = words.values().filter(|v| **v != 0).count();
            match SparsePage::encode(page_no * PAGE_SIZE, &page) {
                None => prop_assert!(nonzero > MAX_SPARSE_WORDS),
                Some(sp) => {
                    prop_assert_eq!(sp.words.len(), nonzero);
                    let mut out = vec![0xffu8; PAGE_SIZE as usize];
                    sp.expand_into(&mut out);
                    prop_assert_eq!(&out, &page);
                    let m = Message::Sparse { pages: vec![sp] };
                    prop_assert_eq!(roundtrip(&m, Compression::None), m);
                }
            }
        }

        #[test]
        fn switchover_round_trips(disks in proptest::collection::vec((".{1,40}", proptest::option::of(".{1,40}")), 0..8)) {
            let disks = disks
                .into_iter()
                .map(|(nbd, lease)| DiskSpec { nbd, lease: lease.map(|l| Secret::new(l).expect("non-empty")) })
                .collect();
            let m = Message::Switchover { disks };
            prop_assert_eq!(roundtrip(&m, Compression::None), m);
        }

        /// Random headers built field by field (a random 16-byte array almost never
        /// has a known command and zero reserved bytes, so it never reached the
        /// decoder): every header the parser accepts is decoded, and a well-formed one
        /// must be accepted.
        #[test]
        fn decoding_arbitrary_headers_and_payloads_never_panics(
            cmd in 0u16..=16, flags in prop_oneof![4 => 0u16..3, 1 => any::<u16>()],
            reserved in prop_oneof![9 => Just(0u32), 1 => any::<u32>()],
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            declared in prop_oneof![9 => Just(None), 1 => any::<u64>().prop_map(Some)]) {
            let length = declared.unwrap_or(payload.len() as u64);
            let mut hdr = [0u8; HEADER_LEN];
            hdr[0..2].copy_from_slice(&cmd.to_le_bytes());
            hdr[2..4].copy_from_slice(&flags.to_le_bytes());
            hdr[4..8].copy_from_slice(&reserved.to_le_bytes());
            hdr[8..16].copy_from_slice(&length.to_le_bytes());
            let c = Command::from_u16(cmd);
            let well_formed = c != Command::Invalid
                && reserved == 0
                && length <= c.max_payload()
                && (flags == 0 || (c == Command::Memory && flags < 3));
            match FrameHeader::parse(&hdr) {
                Ok(h) => {
                    prop_assert!(well_formed, "accepted a malformed header {:?}", h);
                    let n = (h.length as usize).min(payload.len());
                    let _ = Message::decode(&h, &payload[..n]);
                    if h.cmd == Command::Memory {
                        let mut d = Vec::new();
                        let _ = parse_memory(&h, &payload[..n], &mut d);
                    }
                    if h.cmd == Command::Sparse {
                        let _ = parse_sparse(&h, &payload[..n], |_, _| {});
                    }
                }
                Err(_) => prop_assert!(!well_formed, "refused a well-formed header"),
            }
        }

        #[test]
        fn arbitrary_payload_under_any_command_never_panics(cmd in 1u16..=14, flags in 0u16..3,
                                                           payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let h = FrameHeader { cmd: Command::from_u16(cmd), flags, length: payload.len() as u64 };
            let _ = Message::decode(&h, &payload);
        }

        #[test]
        fn memory_round_trips(pages in proptest::collection::btree_set(0u64..4096, 1..20),
                              fill in any::<u8>(), c in 0u16..3) {
            let ranges: Vec<MemRange> = pages.iter().map(|p| MemRange { gpa: p * PAGE_SIZE, len: PAGE_SIZE }).collect();
            let data = vec![fill; ranges.len() * PAGE_SIZE as usize];
            let m = Message::Memory { ranges, data };
            let c = Compression::from_flag(c).expect("valid flag");
            prop_assert_eq!(roundtrip(&m, c), m);
        }

        #[test]
        fn text_messages_round_trip(s in ".{0,200}", code in 1u16..9) {
            let m = Message::Error { code: ErrorCode::from_u16(code), message: s.clone() };
            prop_assert_eq!(roundtrip(&m, Compression::None), m);
            let m = Message::Abandon { reason: s };
            prop_assert_eq!(roundtrip(&m, Compression::None), m);
        }
    }
}
