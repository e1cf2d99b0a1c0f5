//! Exports: what a name in the handshake opens, and the runtime-mutable registry.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::bitmap::{BitmapError, BitmapSet, DirtyBitmap};
use crate::io::NoWait;
use crate::lease::LeaseGate;
use nbd_proto::{MAX_STRING, consts::*};

/// How an export is configured (`--export NAME=PATH[,ro][,unleased][,lease-reads]`
/// or TOML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Not under write leases: every connection may write (unless read-only).
    #[serde(default)]
    pub unleased: bool,
    /// A leased export that refuses a plain `NAME` (no lease token) instead of
    /// opening it read-only: only the lease holder may even read.
    #[serde(default, alias = "lease-reads")]
    pub lease_reads: bool,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("bad export spec {0:?}: expected NAME=PATH[,ro][,unleased][,lease-reads]")]
    BadSpec(String),
    #[error("export {0:?}: lease-reads needs a leased export (drop unleased)")]
    LeaseReadsUnleased(String),
    #[error("bad export name {0:?}: 1..=4096 bytes, no ';' or NUL")]
    BadName(String),
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is neither a regular file nor a block device")]
    NotFileOrDevice(PathBuf),
    #[error("export {0:?} already exists")]
    Exists(String),
    #[error("export {export:?}: {source}")]
    Bitmap {
        export: String,
        #[source]
        source: BitmapError,
    },
}

impl std::str::FromStr for ExportSpec {
    type Err = ExportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| ExportError::BadSpec(s.into()))?;
        let mut parts = rest.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ExportError::BadSpec(s.into()))?;
        let mut spec = ExportSpec {
            name: name.to_owned(),
            path: PathBuf::from(path),
            read_only: false,
            unleased: false,
            lease_reads: false,
            description: None,
        };
        for p in parts {
            match p {
                "ro" => spec.read_only = true,
                "rw" => spec.read_only = false,
                "unleased" => spec.unleased = true,
                "lease-reads" => spec.lease_reads = true,
                _ => return Err(ExportError::BadSpec(s.into())),
            }
        }
        spec.validate()?;
        Ok(spec)
    }
}

impl ExportSpec {
    /// Checks what a spec from flags or TOML may not combine.
    pub fn validate(&self) -> Result<(), ExportError> {
        validate_name(&self.name)?;
        if self.unleased && self.lease_reads {
            return Err(ExportError::LeaseReadsUnleased(self.name.clone()));
        }
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<(), ExportError> {
    if name.is_empty() || name.len() > MAX_STRING || name.contains(';') || name.contains('\0') {
        return Err(ExportError::BadName(name.into()));
    }
    Ok(())
}

/// Splits the handshake's export name into the export and an optional lease token
/// (`NAME;lease=TOKEN`). Any other `;` suffix names no export.
pub fn split_lease(requested: &str) -> (&str, Option<&str>) {
    match requested.split_once(';') {
        Some((name, rest)) => match rest.strip_prefix("lease=") {
            Some(token) => (name, Some(token)),
            None => (requested, None),
        },
        None => (requested, None),
    }
}

/// What backs an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    File,
    BlockDevice,
}

/// Counters per export, read by the control API and metrics.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub connections: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub requests: AtomicU64,
}

impl ExportStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// One open export. Every connection shares its file, so an fdatasync by any of
/// them makes every acknowledged write durable (what CAN_MULTI_CONN promises).
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub path: PathBuf,
    pub file: Arc<File>,
    pub size: u64,
    pub read_only: bool,
    pub leased: bool,
    pub backing: Backing,
    pub description: Option<String>,
    pub lease: LeaseGate,
    pub stats: ExportStats,
    /// Whether inline non-blocking I/O works on this file.
    pub nowait: NoWait,
    /// Cancelled when the export is removed from the registry: every connection
    /// bound to it closes (see [`ExportRegistry::remove`]).
    pub removed: CancellationToken,
    /// Mirror jobs following this export's changes (see [`crate::mirror::tap`]).
    pub mirrors: crate::mirror::MirrorTap,
    /// Dirty bitmaps: every write-like request marks all of them before it is
    /// acknowledged (see [`crate::bitmap`]).
    pub bitmaps: BitmapSet,
    /// Changes between their dirty-bitmap mark and their landing (see
    /// [`crate::bitmap::inflight`]).
    pub inflight: crate::bitmap::InFlight,
}

// Block device ioctls from linux/fs.h.
pub(crate) const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
pub(crate) const BLKDISCARD: libc::c_ulong = 0x1277;
pub(crate) const BLKZEROOUT: libc::c_ulong = 0x127f;

impl Export {
    /// Opens the file or block device named by `spec`.
    pub fn open(spec: &ExportSpec) -> Result<Self, ExportError> {
        validate_name(&spec.name)?;
        let open_err = |source| ExportError::Open {
            path: spec.path.clone(),
            source,
        };
        let file = File::options()
            .read(true)
            .write(!spec.read_only)
            .open(&spec.path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let ft = meta.file_type();
        let (backing, size) = if ft.is_file() {
            (Backing::File, meta.len())
        } else if ft.is_block_device() {
            (
                Backing::BlockDevice,
                block_device_size(&file).map_err(open_err)?,
            )
        } else {
            return Err(ExportError::NotFileOrDevice(spec.path.clone()));
        };
        let nowait = NoWait::for_file(&file);
        Ok(Self {
            name: spec.name.clone(),
            path: spec.path.clone(),
            file: Arc::new(file),
            size,
            read_only: spec.read_only,
            leased: !spec.unleased,
            backing,
            description: spec.description.clone(),
            lease: LeaseGate::new_unleased(),
            stats: ExportStats::default(),
            nowait,
            removed: CancellationToken::new(),
            mirrors: crate::mirror::MirrorTap::default(),
            bitmaps: BitmapSet::in_memory(size),
            inflight: crate::bitmap::InFlight::new(size),
        })
    }

    /// Loads the export's bitmaps from (and keeps them in) `data_dir`.
    pub fn with_stored_bitmaps(
        self,
        data_dir: &Path,
        al_regions: usize,
    ) -> Result<Self, ExportError> {
        let dir = crate::bitmap::export_dir(data_dir, &self.name);
        let bitmaps =
            BitmapSet::open(&dir, self.size, al_regions).map_err(|source| ExportError::Bitmap {
                export: self.name.clone(),
                source,
            })?;
        Ok(Self { bitmaps, ..self })
    }

    /// Creates the dirty bitmap `name`: it records every write admitted from now on.
    pub fn create_bitmap(
        &self,
        name: &str,
        granularity: u64,
    ) -> Result<Arc<DirtyBitmap>, BitmapError> {
        self.bitmaps.create(name, granularity)
    }

    pub fn bitmap(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        self.bitmaps.get(name)
    }

    pub fn remove_bitmap(&self, name: &str) -> Result<(), BitmapError> {
        self.bitmaps.remove(name)
    }

    /// The transmission flags advertised for this export; `structured` tells
    /// whether the client negotiated structured replies (DF needs them).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_CACHE;
        if structured {
            f |= TFLAG_SEND_DF;
        }
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        }
        f
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn block_device_size(file: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is live.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &raw mut size) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

/// Exports by name, shared by the NBD listeners and the control API; exports can
/// be added and removed while the server runs. Connections hold an `Arc<Export>`;
/// removing an export closes them (its `removed` token), and a connection still in
/// its handshake with the removed export closes as soon as it starts serving.
#[derive(Debug, Default)]
pub struct ExportRegistry {
    map: RwLock<BTreeMap<String, Arc<Export>>>,
    /// Where exports opened through the registry keep their bitmaps.
    bitmap_store: std::sync::OnceLock<BitmapStore>,
}

/// Where and how exports keep their dirty bitmaps.
#[derive(Debug, Clone)]
pub struct BitmapStore {
    /// `--data-dir`; None keeps bitmaps in memory only.
    pub data_dir: Option<PathBuf>,
    /// Activity-log size, in regions.
    pub al_regions: usize,
}

impl Default for BitmapStore {
    fn default() -> Self {
        Self {
            data_dir: None,
            al_regions: crate::bitmap::DEFAULT_AL_REGIONS,
        }
    }
}

impl BitmapStore {
    /// Gives `export` its stored bitmaps (none without a data directory).
    pub fn attach(&self, export: Export) -> Result<Export, ExportError> {
        match &self.data_dir {
            Some(d) => export.with_stored_bitmaps(d, self.al_regions),
            None => Ok(export),
        }
    }
}

impl ExportRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A registry whose exports keep their bitmaps as `store` says.
    pub fn with_bitmap_store(store: BitmapStore) -> Arc<Self> {
        let r = Self::default();
        let _ = r.bitmap_store.set(store);
        Arc::new(r)
    }

    pub fn bitmap_store(&self) -> BitmapStore {
        self.bitmap_store.get().cloned().unwrap_or_default()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.map.read().ok()?.get(name).cloned()
    }

    /// The export a client gets for the empty name: the only one, if there is one.
    pub fn default_export(&self) -> Option<Arc<Export>> {
        let map = self.map.read().ok()?;
        if map.len() == 1 {
            map.values().next().cloned()
        } else {
            None
        }
    }

    pub fn insert(&self, export: Arc<Export>) -> Result<(), ExportError> {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&export.name) {
            return Err(ExportError::Exists(export.name.clone()));
        }
        map.insert(export.name.clone(), export);
        Ok(())
    }

    /// Stops serving `name` and closes every connection bound to it.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let removed = self
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(e) = &removed {
            e.removed.cancel();
        }
        removed
    }

    pub fn list(&self) -> Vec<Arc<Export>> {
        self.map
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        let s: ExportSpec = "disk=/tmp/a.img,ro,unleased".parse().unwrap();
        assert_eq!(s.name, "disk");
        assert_eq!(s.path, PathBuf::from("/tmp/a.img"));
        assert!(s.read_only && s.unleased);
        let s: ExportSpec = "d=/x".parse().unwrap();
        assert!(!s.read_only && !s.unleased);
        assert!("noequals".parse::<ExportSpec>().is_err());
        assert!("d=".parse::<ExportSpec>().is_err());
        assert!("d=/x,bogus".parse::<ExportSpec>().is_err());
        assert!("a;b=/x".parse::<ExportSpec>().is_err());
        let s: ExportSpec = "d=/x,lease-reads".parse().unwrap();
        assert!(s.lease_reads && !s.unleased);
        assert!(matches!(
            "d=/x,unleased,lease-reads".parse::<ExportSpec>(),
            Err(ExportError::LeaseReadsUnleased(_))
        ));
    }

    #[test]
    fn lease_suffix() {
        assert_eq!(split_lease("disk"), ("disk", None));
        assert_eq!(split_lease("disk;lease=abc"), ("disk", Some("abc")));
        assert_eq!(split_lease("disk;other=1"), ("disk;other=1", None));
    }

    #[test]
    fn registry_add_remove() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.img");
        File::create(&p).unwrap().set_len(4096).unwrap();
        let reg = ExportRegistry::new();
        let spec = ExportSpec {
            name: "x".into(),
            path: p,
            read_only: true,
            unleased: true,
            lease_reads: false,
            description: None,
        };
        let e = Arc::new(Export::open(&spec).unwrap());
        assert_eq!(e.size, 4096);
        assert_eq!(e.backing, Backing::File);
        assert_ne!(e.transmission_flags(false) & TFLAG_READ_ONLY, 0);
        assert_eq!(e.transmission_flags(false) & TFLAG_SEND_TRIM, 0);
        reg.insert(Arc::clone(&e)).unwrap();
        assert!(reg.insert(e).is_err());
        assert!(reg.get("x").is_some());
        assert!(reg.default_export().is_some());
        assert_eq!(reg.list().len(), 1);
        assert!(reg.remove("x").is_some());
        assert!(reg.get("x").is_none());
    }
}
