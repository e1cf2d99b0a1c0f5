//! Which files `PUT /v1/exports/{name}` may serve: a token holder reaches only files
//! under the operator's export roots (`--export-root`, default
//! `<data-dir>/exports`) and the block devices the operator listed
//! (`--allow-device`). Exports on the command line (`--export`) are the operator's
//! own and are not confined.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use stagehand_common::api_error::ApiError;
use stagehand_common::paths::{PathError, confine};

/// The operator's limits on API-added exports.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    /// Directories whose files may be served; the first also takes path-less PUTs.
    pub roots: Vec<PathBuf>,
    /// Block devices that may be served (anywhere; no other block device may).
    pub devices: Vec<PathBuf>,
}

impl Confinement {
    /// The file export `name` is served from: `path` resolved (symlinks and `..`
    /// followed) if it lies under a root (a block device only if listed), or
    /// `<first root>/<name>.img` without a path (the root is created if missing).
    pub fn resolve(&self, name: &str, path: Option<&Path>) -> Result<PathBuf, ApiError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => {
                let root = self.roots.first().ok_or_else(|| {
                    ApiError::bad_request(
                        "This node has no export root, so a path-less export has nowhere to go; \
                         give \"path\", or start the node with --export-root DIR or --data-dir DIR.",
                    )
                })?;
                std::fs::create_dir_all(root).map_err(|e| {
                    ApiError::internal(
                        "io_error",
                        format!("Cannot create the export root {}: {e}.", root.display()),
                    )
                })?;
                root.join(format!("{name}.img"))
            }
        };
        if !path.is_absolute() {
            return Err(ApiError::bad_request(format!(
                "path {} must be absolute.",
                path.display()
            )));
        }
        // A listed device is allowed wherever it lives (/dev is no export root).
        if let Ok(resolved) = std::fs::canonicalize(&path)
            && std::fs::metadata(&resolved).is_ok_and(|m| m.file_type().is_block_device())
        {
            let listed = self
                .devices
                .iter()
                .filter_map(|d| std::fs::canonicalize(d).ok())
                .any(|d| d == resolved);
            return if listed {
                Ok(resolved)
            } else {
                Err(ApiError::forbidden_path(format!(
                    "{} is a block device the operator has not allowed; start the node with \
                     --allow-device {} to serve it.",
                    path.display(),
                    path.display()
                )))
            };
        }
        match confine(&path, &self.roots) {
            Ok(resolved) => Ok(resolved),
            Err(e @ PathError::Outside { .. }) => Err(ApiError::forbidden_path(format!(
                "{e}. Exports added through the API must be under an --export-root."
            ))),
            Err(e @ PathError::Relative(_)) => Err(ApiError::bad_request(e.to_string())),
            Err(e @ PathError::Unresolvable { .. }) => Err(ApiError::bad_request(format!("{e}."))),
        }
    }

    /// Whether a stored export's path is still allowed (the roots may have changed
    /// since it was added).
    pub fn allows(&self, path: &Path) -> bool {
        self.resolve("", Some(path)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<PathBuf, ApiError>) -> &'static str {
        r.map(|_| "ok").unwrap_or_else(|e| e.code)
    }

    #[test]
    fn files_under_roots_only_and_devices_only_when_listed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("exports");
        let c = Confinement {
            roots: vec![root.clone()],
            devices: Vec::new(),
        };
        // Path-less: created root, <name>.img.
        let p = c.resolve("vm7", None).unwrap();
        assert_eq!(p, root.canonicalize().unwrap().join("vm7.img"));
        std::fs::write(d.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(d.path().join("secret"), root.join("link")).unwrap();
        assert_eq!(
            code(c.resolve("x", Some(Path::new("/etc/passwd")))),
            "path_not_allowed"
        );
        assert_eq!(
            code(c.resolve("x", Some(&root.join("../secret")))),
            "path_not_allowed"
        );
        assert_eq!(
            code(c.resolve("x", Some(&root.join("link")))),
            "path_not_allowed"
        );
        assert_eq!(
            code(c.resolve("x", Some(Path::new("rel.img")))),
            "bad_request"
        );
        assert_eq!(code(c.resolve("x", Some(&root.join("new.img")))), "ok");
        assert!(c.allows(&root.canonicalize().unwrap().join("new.img")));
        assert!(!c.allows(Path::new("/etc/passwd")));
        // No roots: nothing, and a path-less PUT has nowhere to go.
        let none = Confinement::default();
        assert_eq!(code(none.resolve("x", None)), "bad_request");
        assert_eq!(
            code(none.resolve("x", Some(&root.join("new.img")))),
            "path_not_allowed"
        );
        // A block device, even under a root, needs listing.
        let dev = std::fs::read_dir("/dev")
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device()));
        if let Some(dev) = dev {
            let under_dev = Confinement {
                roots: vec!["/dev".into()],
                devices: Vec::new(),
            };
            assert_eq!(code(under_dev.resolve("x", Some(&dev))), "path_not_allowed");
            let listed = Confinement {
                roots: Vec::new(),
                devices: vec![dev.clone()],
            };
            assert_eq!(code(listed.resolve("x", Some(&dev))), "ok");
        }
    }
}
