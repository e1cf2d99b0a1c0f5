//! Authentication helpers: keyed BLAKE3 proofs over both nonces, never the key itself.

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
