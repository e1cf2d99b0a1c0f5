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
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::bufpool::Buf;

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

/// Result of one operation: the buffer comes back whatever happened.
pub(crate) type OpResult = (Buf, io::Result<usize>);

/// One operation in flight; it owns everything the kernel may touch.
pub(crate) struct Op {
    pub file: Arc<File>,
    pub kind: OpKind,
    pub offset: u64,
    pub buf: Buf,
    pub pos: usize,
    pub done: oneshot::Sender<OpResult>,
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
        buf: Buf,
        pos: usize,
    ) -> OpResult {
        let (done, rx) = oneshot::channel();
        let op = Op {
            file: Arc::clone(file),
            kind,
            offset,
            buf,
            pos,
            done,
        };
        let sent = match &self.backend {
            Backend::Uring(u) => u.submit(op),
            Backend::Threads(p) => p.submit(op),
        };
        if let Err(op) = sent {
            return (op.buf, Err(io::Error::other("I/O engine stopped")));
        }
        match rx.await {
            Ok(r) => r,
            // The backend drops the sender only when it shuts down mid-operation.
            Err(_) => (Buf::default(), Err(io::Error::other("I/O engine stopped"))),
        }
    }

    /// Fills all of `buf` from `offset`; reading past the end of the file is an error.
    pub async fn read_exact(
        &self,
        file: &Arc<File>,
        offset: u64,
        mut buf: Buf,
    ) -> (Buf, io::Result<()>) {
        let mut pos = 0;
        while pos < buf.len() {
            let (b, r) = self
                .submit(file, OpKind::Read, offset + pos as u64, buf, pos)
                .await;
            buf = b;
            match r {
                Ok(0) => return (buf, Err(io::Error::from(io::ErrorKind::UnexpectedEof))),
                Ok(n) => pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (buf, Err(e)),
            }
        }
        (buf, Ok(()))
    }

    /// Writes all of `buf` at `offset`; with `fua` it is durable when this returns.
    pub async fn write_all(
        &self,
        file: &Arc<File>,
        offset: u64,
        mut buf: Buf,
        fua: bool,
    ) -> (Buf, io::Result<()>) {
        let mut pos = 0;
        while pos < buf.len() {
            let kind = OpKind::Write { dsync: fua };
            let (b, r) = self.submit(file, kind, offset + pos as u64, buf, pos).await;
            buf = b;
            match r {
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
        self.submit(file, OpKind::Fsync, 0, Buf::default(), 0)
            .await
            .1
            .map(|_| ())
    }

    /// fallocate(2) with `mode` (punch hole, zero range).
    pub async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.submit(
            file,
            OpKind::Fallocate { mode, len },
            offset,
            Buf::default(),
            0,
        )
        .await
        .1
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bufpool::BufPool;
    use std::os::unix::fs::FileExt;

    async fn exercise(engine: IoEngine) {
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
        let (_, r) = engine.write_all(&file, 4096, b, true).await;
        r.unwrap();
        let mut direct = vec![0u8; 8192];
        file.read_exact_at(&mut direct, 4096).unwrap();
        assert!(
            direct
                .iter()
                .enumerate()
                .all(|(i, x)| *x == (i % 251) as u8)
        );
        let (b, r) = engine.read_exact(&file, 4096, pool.get(8192)).await;
        r.unwrap();
        assert_eq!(&b[..], &direct[..]);
        engine.sync_data(&file).await.unwrap();
        engine
            .fallocate(
                &file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                4096,
                4096,
            )
            .await
            .unwrap();
        let (b, r) = engine.read_exact(&file, 4096, pool.get(8192)).await;
        r.unwrap();
        assert!(b[..4096].iter().all(|x| *x == 0));
        assert_eq!(&b[4096..], &direct[4096..]);
        // Past the end of the file.
        let (_, r) = engine.read_exact(&file, (1 << 20) - 10, pool.get(20)).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // Many operations in flight at once.
        let mut futs = Vec::new();
        for i in 0..200u64 {
            let mut b = pool.get(512);
            b.fill(i as u8);
            futs.push(engine.write_all(&file, i * 512, b, false));
        }
        for f in futs {
            f.await.1.unwrap();
        }
        for i in 0..200u64 {
            let (b, r) = engine.read_exact(&file, i * 512, pool.get(512)).await;
            r.unwrap();
            assert!(b.iter().all(|x| *x == i as u8));
        }
    }

    #[tokio::test]
    async fn threads_engine_works() {
        exercise(IoEngine::new(EngineKind::Threads).unwrap()).await;
    }

    #[tokio::test]
    async fn uring_engine_works() {
        match IoEngine::new(EngineKind::Uring) {
            Ok(e) => exercise(e).await,
            Err(e) => eprintln!("SKIPPED: io_uring missing ({e})"),
        }
    }
}
