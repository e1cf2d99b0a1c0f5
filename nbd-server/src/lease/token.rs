//! Lease tokens (the holder's secret) and their hashes (what is kept).

use std::fmt;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Bytes of randomness in a lease token (256 bits; the contract asks for >= 128).
pub const TOKEN_BYTES: usize = 32;

/// A lease token: the secret that lets a holder write. Deliberately not `Debug` in
/// clear: it must never reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct LeaseToken(String);

impl LeaseToken {
    /// A fresh token from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = [0u8; TOKEN_BYTES];
        rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut bytes)
            .expect("the kernel's random source (getrandom) does not fail once booted");
        Self(hex(&bytes))
    }

    /// The token as given to the holder (64 lowercase hex digits).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseToken(<redacted>)")
    }
}

/// BLAKE3 hash of a token: what durable state and memory keep instead of the token.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct TokenHash(pub(super) [u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        Self(*blake3::hash(token.as_bytes()).as_bytes())
    }

    /// Constant-time comparison, so that timing reveals nothing about how much of a
    /// guessed token matched.
    pub fn matches(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", hex(&self.0[..4]))
    }
}

impl From<TokenHash> for String {
    fn from(h: TokenHash) -> String {
        hex(&h.0)
    }
}

impl TryFrom<String> for TokenHash {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bytes = unhex(&s).ok_or_else(|| "token hash is not hex".to_string())?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "token hash is not 32 bytes".to_string())?;
        Ok(Self(arr))
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
