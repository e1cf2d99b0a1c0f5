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

use crate::contract::PAGE_SIZE;

pub mod auth;
mod codec;
mod message;

pub use codec::{SparseFrame, memory_frame_prefix, parse_memory, parse_sparse};
pub use message::{AuthKind, ErrorCode, MemRange, Message, SparsePage};

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

#[cfg(test)]
mod tests;
