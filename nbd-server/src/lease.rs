//! Write leases: the seam where epoch fencing plugs in (issue 3 replaces this file).
//!
//! This minimal version grants every connection write access unless the export is
//! read-only, never fences, and refuses lease tokens (no export is leased yet).

use thiserror::Error;

/// Lease state of one export.
#[derive(Debug, Default)]
pub struct LeaseGate {}

/// What a connection was granted at NBD_OPT_GO / EXPORT_NAME.
#[derive(Debug, Clone)]
pub struct Binding {
    pub writable: bool,
}

/// Held while one change (WRITE, TRIM, WRITE_ZEROES) is in flight.
#[derive(Debug)]
pub struct ChangeGuard;

/// Why a connection could not bind; answered with NBD_REP_ERR_POLICY.
#[derive(Debug, Error)]
pub enum BindError {
    #[error("this export takes no lease token")]
    NotLeased,
}

/// The binding may no longer change the export; answered with NBD_EPERM.
#[derive(Debug, Error)]
#[error("write lease fenced")]
pub struct Fenced;

impl LeaseGate {
    pub fn new_unleased() -> Self {
        Self {}
    }

    /// `token` is Some for an export name "NAME;lease=TOKEN", None for plain "NAME".
    pub fn bind(&self, token: Option<&str>, read_only_export: bool) -> Result<Binding, BindError> {
        if token.is_some() {
            return Err(BindError::NotLeased);
        }
        Ok(Binding {
            writable: !read_only_export,
        })
    }

    /// Before every change (WRITE, TRIM, WRITE_ZEROES) is submitted; drop the guard
    /// only once the change has completed or failed.
    pub fn begin_change(&self, binding: &Binding) -> Result<ChangeGuard, Fenced> {
        if binding.writable {
            Ok(ChangeGuard)
        } else {
            Err(Fenced)
        }
    }

    /// Resolves when this binding has been fenced; the connection then closes.
    pub async fn fenced(&self, _binding: &Binding) {
        std::future::pending::<()>().await
    }
}
