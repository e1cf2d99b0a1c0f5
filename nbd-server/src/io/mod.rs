//! File I/O backends for the data path.
//!
//! Both backends take owned buffers ([`Buf`]) and hand them back with the result,
//! so a buffer can never be freed while the kernel (io_uring) or a worker thread
//! still writes into it, even when the request that started the I/O is dropped.
//!
//! - [`uring`]: one dedicated thread owns an io_uring; requests reach it through a
//!   channel plus an eventfd that the ring itself polls, and completions resolve
//!   oneshot futures. Submissions and completions are batched per ring wake-up.
//! - [`threads`]: a fixed pool of threads doing pread/pwritev2/fdatasync/fallocate.
//!
//! `auto` probes io_uring at start (ring creation plus the opcodes we use) and falls
//! back to threads when the kernel lacks it or forbids it (seccomp, sysctl).

pub mod threads;
pub mod uring;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::oneshot;

use crate::bufpool::Buf;
use crate::lease::{ChangeGuard, Fenced};

/// Inline I/O on one file: done on the calling task when it cannot wait for a
/// device, skipping the trip through the engine's thread.
///
/// - Files on memory filesystems (tmpfs, ramfs, hugetlbfs) never wait for a
///   device: every read and write on them is a memory copy, done inline.
/// - Elsewhere, `RWF_NOWAIT` tries the page cache and fails with EAGAIN instead
///   of waiting. It starts optimistic; the first EOPNOTSUPP turns it off for that
///   file for good (some filesystems have no NOWAIT for buffered writes).
#[derive(Debug)]
pub struct NoWait {
    read: AtomicBool,
    write: AtomicBool,
    memory: bool,
}

impl Default for NoWait {
    fn default() -> Self {
        Self {
            read: AtomicBool::new(true),
            write: AtomicBool::new(true),
            memory: false,
        }
    }
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// True when `file` lives on a memory filesystem.
pub fn on_memory_fs(file: &File) -> bool {
    // SAFETY: statfs is plain data; all-zero is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs through the pointer, which is live.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &raw mut st) };
    r == 0
        && matches!(
            st.f_type as i64,
            TMPFS_MAGIC | RAMFS_MAGIC | HUGETLBFS_MAGIC
        )
}

impl NoWait {
    /// The inline policy for `file` (memory filesystem or not).
    pub fn for_file(file: &File) -> Self {
        Self {
            memory: on_memory_fs(file),
            ..Self::default()
        }
    }

    /// True when every operation on the file is done inline.
    pub fn memory(&self) -> bool {
        self.memory
    }

    fn flags(&self) -> i32 {
        if self.memory { 0 } else { libc::RWF_NOWAIT }
    }
}

impl NoWait {
    /// Reads into `buf[*pos..]` from `offset + *pos` inline, for as long as that
    /// does not block (`RWF_NOWAIT`: data already in the page cache). On return
    /// `*pos` says how far it got; the caller hands the rest to the engine.
    pub fn read(
        &self,
        file: &File,
        offset: u64,
        buf: &mut [u8],
        pos: &mut usize,
    ) -> io::Result<()> {
        while self.read.load(Ordering::Relaxed) && *pos < buf.len() {
            let rest = &mut buf[*pos..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            // SAFETY: one iovec over memory we borrow mutably for the call; with
            // RWF_NOWAIT (or on a memory filesystem) the call never waits for a device.
            let r = unsafe {
                libc::preadv2(
                    file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + *pos as u64) as i64,
                    self.flags(),
                )
            };
            match try_nowait(&self.read, r) {
                Some(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Some(Ok(n)) => *pos += n,
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        Ok(())
    }

    /// Writes `buf[*pos..]` inline while that does not block; see [`NoWait::read`].
    pub fn write(&self, file: &File, offset: u64, buf: &[u8], pos: &mut usize) -> io::Result<()> {
        while self.write.load(Ordering::Relaxed) && *pos < buf.len() {
            let rest = &buf[*pos..];
            let iov = libc::iovec {
                iov_base: rest.as_ptr().cast_mut().cast(),
                iov_len: rest.len(),
            };
            // SAFETY: as in `read`; the kernel only reads from the buffer.
            let r = unsafe {
                libc::pwritev2(
                    file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + *pos as u64) as i64,
                    self.flags(),
                )
            };
            match try_nowait(&self.write, r) {
                Some(Ok(0)) | None => break,
                Some(Ok(n)) => *pos += n,
                Some(Err(e)) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Outcome of an inline attempt: bytes done, or the error to report, or `None`
/// when the engine must take over (it would block, or NOWAIT is unsupported).
fn try_nowait(flag: &AtomicBool, r: isize) -> Option<io::Result<usize>> {
    if r >= 0 {
        return Some(Ok(r as usize));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) => None,
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
            flag.store(false, Ordering::Relaxed);
            None
        }
        _ => Some(Err(e)),
    }
}

/// Which backend to use (`--io-engine`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    #[default]
    Auto,
    Uring,
    Threads,
}

/// What one operation does.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OpKind {
    /// Read into `buf[pos..]`.
    Read,
    /// Write `buf[pos..]`, durable before completion when `dsync`.
    Write { dsync: bool },
    /// fdatasync.
    Fsync,
    /// fallocate(mode, offset, len).
    Fallocate { mode: i32, len: u64 },
}

/// Result of one operation: the buffer comes back whatever happened, and the lease
/// guard when a short write leaves more of the same change to issue.
pub(crate) struct OpResult {
    pub buf: Buf,
    pub res: io::Result<usize>,
    pub guard: Option<ChangeGuard>,
}

/// One operation in flight; it owns everything the kernel may touch.
pub(crate) struct Op {
    pub file: Arc<File>,
    pub kind: OpKind,
    pub offset: u64,
    pub buf: Buf,
    pub pos: usize,
    /// The lease guard of a change (write, fallocate) on a leased export.
    pub guard: Option<ChangeGuard>,
    pub done: oneshot::Sender<OpResult>,
}

/// The error a change gets when its epoch was fenced while it waited to be issued.
pub(crate) fn fenced_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, Fenced)
}

/// True for the error of [`fenced_error`].
pub(crate) fn is_fenced_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Fenced>())
}

impl Op {
    /// The backends call this immediately before they hand the operation to the
    /// kernel: false when it is a change whose lease epoch has been fenced since it
    /// was admitted; the backend then completes it with [`fenced_error`] instead.
    pub(crate) fn may_issue(&self) -> bool {
        self.guard.as_ref().is_none_or(ChangeGuard::may_issue)
    }

    /// True for a change on a leased export (a fence may wait for it).
    pub(crate) fn is_leased_change(&self) -> bool {
        self.guard.as_ref().is_some_and(ChangeGuard::is_leased)
    }

    /// Hands the result back. The lease guard is dropped here, on the backend's
    /// thread, the moment the kernel is done with the change, so a waiting fence
    /// does not also wait for the requesting task to be scheduled; only a short
    /// write (more of the same change to issue) returns it to the caller.
    pub(crate) fn complete(mut self, res: io::Result<usize>) {
        let buf = std::mem::take(&mut self.buf);
        let more = matches!(self.kind, OpKind::Write { .. })
            && match &res {
                Ok(n) => *n > 0 && self.pos + n < buf.len(),
                Err(e) => e.kind() == io::ErrorKind::Interrupted,
            };
        let guard = if more { self.guard.take() } else { None };
        drop(self.guard.take());
        // The receiver may be gone (request abandoned); the buffer is then just freed.
        let _ = self.done.send(OpResult { buf, res, guard });
    }
}

enum Backend {
    Uring(uring::Uring),
    Threads(threads::Pool),
}

/// The I/O engine shared by all connections.
pub struct IoEngine {
    backend: Backend,
}

impl std::fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoEngine")
            .field("backend", &self.name())
            .finish()
    }
}

impl IoEngine {
    /// Starts the chosen backend; `Auto` uses io_uring when the probe succeeds.
    pub fn new(kind: EngineKind) -> io::Result<Self> {
        let backend = match kind {
            EngineKind::Uring => Backend::Uring(uring::Uring::new()?),
            EngineKind::Threads => {
                Backend::Threads(threads::Pool::new(threads::default_threads())?)
            }
            EngineKind::Auto => match uring::Uring::new() {
                Ok(u) => Backend::Uring(u),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable, using the thread pool");
                    Backend::Threads(threads::Pool::new(threads::default_threads())?)
                }
            },
        };
        Ok(Self { backend })
    }

    pub fn name(&self) -> &'static str {
        match self.backend {
            Backend::Uring(_) => "uring",
            Backend::Threads(_) => "threads",
        }
    }

    async fn submit(
        &self,
        file: &Arc<File>,
        kind: OpKind,
        offset: u64,
        (buf, pos): (Buf, usize),
        guard: Option<ChangeGuard>,
    ) -> OpResult {
        let (done, rx) = oneshot::channel();
        let op = Op {
            file: Arc::clone(file),
            kind,
            offset,
            buf,
            pos,
            guard,
            done,
        };
        let sent = match &self.backend {
            Backend::Uring(u) => u.submit(op),
            Backend::Threads(p) => p.submit(op),
        };
        if let Err(op) = sent {
            return OpResult {
                buf: op.buf,
                res: Err(io::Error::other("I/O engine stopped")),
                guard: None,
            };
        }
        match rx.await {
            Ok(r) => r,
            // The backend drops the sender only when it shuts down mid-operation.
            Err(_) => OpResult {
                buf: Buf::default(),
                res: Err(io::Error::other("I/O engine stopped")),
                guard: None,
            },
        }
    }

    /// Fills all of `buf` from `offset`; reading past the end of the file is an error.
    ///
    /// With `nowait`, the read is first tried inline with `RWF_NOWAIT`: data already
    /// in the page cache is copied without a trip through the backend's thread.
    pub async fn read_exact(
        &self,
        file: &Arc<File>,
        nowait: Option<&NoWait>,
        offset: u64,
        mut buf: Buf,
    ) -> (Buf, io::Result<()>) {
        let mut pos = 0;
        if let Some(nw) = nowait
            && let Err(e) = nw.read(file, offset, &mut buf, &mut pos)
        {
            return (buf, Err(e));
        }
        while pos < buf.len() {
            let done = self
                .submit(file, OpKind::Read, offset + pos as u64, (buf, pos), None)
                .await;
            buf = done.buf;
            match done.res {
                Ok(0) => return (buf, Err(io::Error::from(io::ErrorKind::UnexpectedEof))),
                Ok(n) => pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (buf, Err(e)),
            }
        }
        (buf, Ok(()))
    }

    /// Writes all of `buf` at `offset`; with `fua` it is durable when this returns.
    ///
    /// `guard` is the change's lease guard: the write is only issued while its epoch
    /// is current (else it fails with `fenced_error`), and the guard is released as
    /// soon as the kernel is done with the write. Non-FUA writes with `nowait` are
    /// first tried inline with `RWF_NOWAIT`.
    pub async fn write_all(
        &self,
        file: &Arc<File>,
        nowait: Option<&NoWait>,
        offset: u64,
        mut buf: Buf,
        fua: bool,
        guard: ChangeGuard,
    ) -> (Buf, io::Result<()>) {
        let mut pos = 0;
        if let Some(nw) = nowait.filter(|_| !fua) {
            if !guard.may_issue() {
                return (buf, Err(fenced_error()));
            }
            if let Err(e) = nw.write(file, offset, &buf, &mut pos) {
                return (buf, Err(e));
            }
        }
        let mut guard = Some(guard);
        while pos < buf.len() {
            let kind = OpKind::Write { dsync: fua };
            // A backend returns the guard with a short write or EINTR (see
            // `Op::complete`); without it the rest is refused, never issued unaccounted.
            let Some(g) = guard.take() else {
                return (buf, Err(io::Error::other("write lost its lease guard")));
            };
            let done = self
                .submit(file, kind, offset + pos as u64, (buf, pos), Some(g))
                .await;
            buf = done.buf;
            guard = done.guard;
            match done.res {
                Ok(0) => return (buf, Err(io::Error::from(io::ErrorKind::WriteZero))),
                Ok(n) => pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (buf, Err(e)),
            }
        }
        (buf, Ok(()))
    }

    /// fdatasync: every write completed before this call is durable when it returns.
    pub async fn sync_data(&self, file: &Arc<File>) -> io::Result<()> {
        self.submit(file, OpKind::Fsync, 0, (Buf::default(), 0), None)
            .await
            .res
            .map(|_| ())
    }

    /// fallocate(2) with `mode` (punch hole, zero range), a change under `guard`
    /// (see [`IoEngine::write_all`]).
    pub async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
        guard: ChangeGuard,
    ) -> io::Result<()> {
        self.submit(
            file,
            OpKind::Fallocate { mode, len },
            offset,
            (Buf::default(), 0),
            Some(guard),
        )
        .await
        .res
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bufpool::BufPool;
    use crate::lease::LeaseGate;
    use std::os::unix::fs::FileExt;

    /// The guard of a change on an unleased export.
    fn g() -> ChangeGuard {
        let gate = LeaseGate::new_unleased();
        let binding = gate.bind(None, false).unwrap();
        gate.begin_change(&binding).unwrap()
    }

    async fn exercise(engine: IoEngine, nw: Option<&NoWait>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let file = Arc::new(f);
        let pool = BufPool::new();
        let mut b = pool.get(8192);
        b.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (i % 251) as u8);
        let (_, r) = engine.write_all(&file, nw, 4096, b, true, g()).await;
        r.unwrap();
        let mut direct = vec![0u8; 8192];
        file.read_exact_at(&mut direct, 4096).unwrap();
        assert!(
            direct
                .iter()
                .enumerate()
                .all(|(i, x)| *x == (i % 251) as u8)
        );
        let (b, r) = engine.read_exact(&file, nw, 4096, pool.get(8192)).await;
        r.unwrap();
        assert_eq!(&b[..], &direct[..]);
        engine.sync_data(&file).await.unwrap();
        engine
            .fallocate(
                &file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                4096,
                4096,
                g(),
            )
            .await
            .unwrap();
        let (b, r) = engine.read_exact(&file, nw, 4096, pool.get(8192)).await;
        r.unwrap();
        assert!(b[..4096].iter().all(|x| *x == 0));
        assert_eq!(&b[4096..], &direct[4096..]);
        // Past the end of the file.
        let (_, r) = engine
            .read_exact(&file, nw, (1 << 20) - 10, pool.get(20))
            .await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // Many operations in flight at once.
        let mut futs = Vec::new();
        for i in 0..200u64 {
            let mut b = pool.get(512);
            b.fill(i as u8);
            futs.push(engine.write_all(&file, nw, i * 512, b, false, g()));
        }
        for f in futs {
            f.await.1.unwrap();
        }
        for i in 0..200u64 {
            let (b, r) = engine.read_exact(&file, nw, i * 512, pool.get(512)).await;
            r.unwrap();
            assert!(b.iter().all(|x| *x == i as u8));
        }
    }

    /// Changes still queued when their epoch is fenced fail instead of landing, and
    /// the fence's drain ends once the issued ones are done: after it, the file
    /// never changes again, and every write that failed as fenced left no byte.
    async fn fence_fails_queued_changes(engine: IoEngine) {
        use crate::lease::{LeasePolicy, LeaseRecord, LeaseToken};
        const N: u64 = 256;
        const LEN: usize = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(tempfile::tempfile_in(dir.path()).unwrap());
        file.set_len(N * LEN as u64).unwrap();
        let gate = LeaseGate::new_leased(LeaseRecord::default(), LeasePolicy::default());
        let t1 = LeaseToken::generate();
        gate.fence("d", 1, "a", t1.hash()).unwrap();
        let binding = gate.bind(Some(t1.expose()), false).unwrap();
        let engine = Arc::new(engine);
        let pool = BufPool::new();
        let mut tasks = Vec::new();
        for i in 0..N {
            let mut b = pool.get(LEN);
            b.fill(1 + (i % 250) as u8);
            let guard = gate.begin_change(&binding).unwrap();
            let (engine, file) = (Arc::clone(&engine), Arc::clone(&file));
            tasks.push(tokio::spawn(async move {
                engine
                    .write_all(&file, None, i * LEN as u64, b, false, guard)
                    .await
                    .1
            }));
        }
        // Let every task hand its write to the engine, then fence mid-stream.
        tokio::task::yield_now().await;
        let ticket = gate
            .fence("d", 2, "b", LeaseToken::generate().hash())
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), ticket.drained())
            .await
            .expect("the fence drains");
        let mut at_fence = vec![0u8; N as usize * LEN];
        file.read_exact_at(&mut at_fence, 0).unwrap();
        let mut fenced = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            let chunk = &at_fence[i * LEN..(i + 1) * LEN];
            match t.await.unwrap() {
                Ok(()) => assert!(chunk.iter().all(|&x| x == 1 + (i % 250) as u8)),
                Err(e) => {
                    assert!(is_fenced_error(&e), "unexpected error {e}");
                    assert!(chunk.iter().all(|&x| x == 0), "a fenced write landed");
                    fenced += 1;
                }
            }
        }
        assert!(fenced > 0, "no queued write was failed by the fence");
        let mut after = vec![0u8; N as usize * LEN];
        file.read_exact_at(&mut after, 0).unwrap();
        assert!(
            after == at_fence,
            "the file changed after the fence drained"
        );
    }

    /// io_uring only: changes already handed to the kernel but queued behind a long
    /// write to the same file (the kernel runs buffered writes to one file one at a
    /// time when the file system cannot do them without blocking) are cancelled by
    /// the ring thread's fence tick instead of being waited for.
    #[tokio::test]
    async fn uring_fence_cancels_changes_queued_in_the_kernel() {
        use crate::lease::{LeasePolicy, LeaseRecord, LeaseToken};
        let engine = match IoEngine::new(EngineKind::Uring) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                {
                    use std::io::Write as _;
                    let _ = writeln!(std::io::stderr(), "SKIPPED: io_uring missing ({e})");
                };
                return;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(tempfile::tempfile_in(dir.path()).unwrap());
        if NoWait::for_file(&file).memory() {
            {
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: the temporary directory is on a memory file system"
                );
            };
            return;
        }
        const BIG: usize = 64 << 20;
        const N: u64 = 64;
        file.set_len(BIG as u64 + N * 4096).unwrap();
        let pool = BufPool::new();
        // A long durable write in front (unleased: nothing cancels it).
        let big = {
            let (engine, file) = (Arc::clone(&engine), Arc::clone(&file));
            let mut b = pool.get(BIG);
            b.fill(1);
            tokio::spawn(async move { engine.write_all(&file, None, 0, b, true, g()).await.1 })
        };
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        let gate = LeaseGate::new_leased(LeaseRecord::default(), LeasePolicy::default());
        let t1 = LeaseToken::generate();
        gate.fence("d", 1, "a", t1.hash()).unwrap();
        let binding = gate.bind(Some(t1.expose()), false).unwrap();
        let mut small = Vec::new();
        for i in 0..N {
            let mut b = pool.get(4096);
            b.fill(2);
            let guard = gate.begin_change(&binding).unwrap();
            let (engine, file) = (Arc::clone(&engine), Arc::clone(&file));
            let offset = BIG as u64 + i * 4096;
            small.push(tokio::spawn(async move {
                engine
                    .write_all(&file, None, offset, b, false, guard)
                    .await
                    .1
            }));
        }
        // Long enough for the ring thread to hand them all to the kernel.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let big_done = big.is_finished();
        let ticket = gate
            .fence("d", 2, "b", LeaseToken::generate().hash())
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(30), ticket.drained())
            .await
            .expect("the fence drains");
        let mut tail = vec![0u8; N as usize * 4096];
        file.read_exact_at(&mut tail, BIG as u64).unwrap();
        let mut fenced = 0;
        for (i, t) in small.into_iter().enumerate() {
            let chunk = &tail[i * 4096..(i + 1) * 4096];
            match t.await.unwrap() {
                Ok(()) => assert!(chunk.iter().all(|&x| x == 2)),
                Err(e) => {
                    assert!(is_fenced_error(&e), "unexpected error {e}");
                    assert!(chunk.iter().all(|&x| x == 0), "a fenced write landed");
                    fenced += 1;
                }
            }
        }
        big.await.unwrap().unwrap();
        if big_done {
            {
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED (inconclusive): the long write ended before the fence"
                );
            };
            return;
        }
        assert!(fenced > 0, "no write queued in the kernel was cancelled");
    }

    #[tokio::test]
    async fn threads_fence_fails_queued_changes() {
        fence_fails_queued_changes(IoEngine::new(EngineKind::Threads).unwrap()).await;
    }

    #[tokio::test]
    async fn uring_fence_fails_queued_changes() {
        match IoEngine::new(EngineKind::Uring) {
            Ok(e) => fence_fails_queued_changes(e).await,
            Err(e) => {
                use std::io::Write as _;
                let _ = writeln!(std::io::stderr(), "SKIPPED: io_uring missing ({e})");
            }
        }
    }

    #[tokio::test]
    async fn threads_engine_works() {
        exercise(IoEngine::new(EngineKind::Threads).unwrap(), None).await;
    }

    #[tokio::test]
    async fn nowait_fast_path_works() {
        let nw = NoWait::default();
        exercise(IoEngine::new(EngineKind::Threads).unwrap(), Some(&nw)).await;
    }

    #[tokio::test]
    async fn uring_engine_works() {
        match IoEngine::new(EngineKind::Uring) {
            Ok(e) => exercise(e, None).await,
            Err(e) => {
                use std::io::Write as _;
                let _ = writeln!(std::io::stderr(), "SKIPPED: io_uring missing ({e})");
            }
        }
    }
}
