//! The protocol's messages, decoded: what each frame carries (the wire form is in
//! `codec`).

use super::{ID_LEN, MAX_SPARSE_WORDS, NONCE_LEN, SwitchoverMode};
use crate::contract::{DiskSpec, VmSpec};

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

    pub(super) fn wire_len(&self) -> usize {
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
