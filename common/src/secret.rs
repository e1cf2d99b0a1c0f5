//! Secrets (API tokens, lease tokens) that must never reach a log line, a URI or a
//! `Debug` print: [`Secret`] only shows itself through [`Secret::expose`].

use std::fmt;
use std::path::Path;

use subtle::ConstantTimeEq;
use thiserror::Error;

/// A secret string. `Debug` and `Display` print `<redacted>`; comparisons are in
/// constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

#[derive(Debug, Error)]
pub enum SecretError {
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the token file {0} is empty")]
    Empty(String),
    #[error("the token is empty")]
    EmptyToken,
    #[error("give either a token or a token file, not both")]
    Both,
}

impl Secret {
    /// Wraps `s`; an empty secret is refused (it would authenticate anyone who sends
    /// an empty header).
    pub fn new(s: impl Into<String>) -> Result<Self, SecretError> {
        let s = s.into();
        if s.is_empty() {
            return Err(SecretError::EmptyToken);
        }
        Ok(Self(s))
    }

    /// Reads a token file: its first line, without surrounding white space.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let t = text.lines().next().unwrap_or("").trim();
        if t.is_empty() {
            return Err(SecretError::Empty(path.display().to_string()));
        }
        Ok(Self(t.to_string()))
    }

    /// The token from a `--x-token` / `--x-token-file` pair of flags, if either is set.
    pub fn from_flags(
        token: Option<&str>,
        file: Option<&Path>,
    ) -> Result<Option<Self>, SecretError> {
        match (token, file) {
            (Some(_), Some(_)) => Err(SecretError::Both),
            (Some(t), None) => Self::new(t).map(Some),
            (None, Some(f)) => Self::from_file(f).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// A new random token: 256 bits, hex.
    pub fn random() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The secret itself, for the one place that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison with a presented value. Both sides are hashed
    /// first, so the time taken reveals neither the content nor the length.
    pub fn matches(&self, presented: &str) -> bool {
        let a = blake3::hash(self.0.as_bytes());
        let b = blake3::hash(presented.as_bytes());
        a.as_bytes().ct_eq(b.as_bytes()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl serde::Serialize for Secret {
    /// Serializes the secret itself: only for the wire and durable state, never for
    /// views shown to people (those leave it out).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Secret::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_secret() {
        let s = Secret::new("hunter2-token").unwrap();
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{s}"), "<redacted>");
        assert!(!format!("{:?}", Some(&s)).contains("hunter2"));
    }

    #[test]
    fn matches_only_the_same_token() {
        let s = Secret::new("abc").unwrap();
        assert!(s.matches("abc"));
        assert!(!s.matches("abd"));
        assert!(!s.matches("ab"));
        assert!(!s.matches("abc "));
        assert!(!s.matches(""));
    }

    #[test]
    fn token_file_first_line_trimmed_and_empty_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "  tok123 \nignored\n").unwrap();
        assert_eq!(Secret::from_file(&p).unwrap().expose(), "tok123");
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(Secret::from_file(&p), Err(SecretError::Empty(_))));
        assert!(matches!(Secret::new(""), Err(SecretError::EmptyToken)));
        assert!(matches!(
            Secret::from_flags(Some("a"), Some(&p)),
            Err(SecretError::Both)
        ));
        assert!(Secret::from_flags(None, None).unwrap().is_none());
    }

    #[test]
    fn random_tokens_are_long_and_distinct() {
        let a = Secret::random();
        let b = Secret::random();
        assert_eq!(a.expose().len(), 64);
        assert_ne!(a, b);
    }
}
