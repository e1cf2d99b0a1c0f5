//! Confinement of request-supplied paths to the directories an operator configured
//! (export roots, images, memory dumps): a token holder reaches nothing else.

use std::path::{Component, Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    #[error("{path} is not under any allowed directory ({roots}); the operator configures those")]
    Outside { path: String, roots: String },
    #[error("{0} must be an absolute path")]
    Relative(String),
    #[error("{path}: {reason}")]
    Unresolvable { path: String, reason: String },
}

/// Resolves `path` (absolute; it may not exist yet, but its parent must) with every
/// symlink followed, and returns it if it lies under one of `roots`. `..` and
/// symlinks cannot escape: the check is on the resolved path.
pub fn confine(path: &Path, roots: &[PathBuf]) -> Result<PathBuf, PathError> {
    if !path.is_absolute() {
        return Err(PathError::Relative(path.display().to_string()));
    }
    let resolved = resolve(path)?;
    for root in roots {
        // A root that does not exist cannot hold anything.
        let Ok(r) = std::fs::canonicalize(root) else {
            continue;
        };
        if resolved.starts_with(&r) {
            return Ok(resolved);
        }
    }
    Err(PathError::Outside {
        path: path.display().to_string(),
        roots: if roots.is_empty() {
            "none configured".into()
        } else {
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
    })
}

fn resolve(path: &Path) -> Result<PathBuf, PathError> {
    let unresolvable = |reason: String| PathError::Unresolvable {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A file to be created: resolve its parent, keep a plain final name.
            let name = match path.components().next_back() {
                Some(Component::Normal(n)) => n.to_owned(),
                _ => return Err(unresolvable("has no file name".into())),
            };
            let parent = path
                .parent()
                .ok_or_else(|| unresolvable("has no parent directory".into()))?;
            let parent = std::fs::canonicalize(parent)
                .map_err(|e| unresolvable(format!("its directory cannot be resolved: {e}")))?;
            Ok(parent.join(name))
        }
        Err(e) => Err(unresolvable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_passes_outside_and_escapes_fail() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("a.img"), b"x").unwrap();
        std::fs::write(d.path().join("secret"), b"x").unwrap();
        let roots = [root.clone()];
        assert!(confine(&root.join("a.img"), &roots).is_ok());
        assert!(confine(&root.join("new.img"), &roots).is_ok());
        assert!(matches!(
            confine(&root.join("../secret"), &roots),
            Err(PathError::Outside { .. })
        ));
        std::os::unix::fs::symlink(d.path().join("secret"), root.join("link")).unwrap();
        assert!(matches!(
            confine(&root.join("link"), &roots),
            Err(PathError::Outside { .. })
        ));
        assert!(matches!(
            confine(Path::new("rel/a.img"), &roots),
            Err(PathError::Relative(_))
        ));
        assert!(matches!(
            confine(&root.join("a.img"), &[]),
            Err(PathError::Outside { .. })
        ));
        assert!(matches!(
            confine(&root.join("nodir/x.img"), &roots),
            Err(PathError::Unresolvable { .. })
        ));
    }
}
