//! The transmission phase of one connection.
//!
//! A reader loop decodes requests, checks them, reads their payload into pooled
//! buffers and spawns one task per request, so replies go out in completion order.
//! A single writer task owns the socket's write half and batches replies: it
//! drains every reply that is ready before one flush (one `write` syscall for many
//! small replies; large read payloads go out without an extra copy).
//!
//! Memory per connection is bounded: every request holds permits from a weighted
//! semaphore (one per request plus one per 64 KiB of payload) from before its
//! payload is read until its reply has been written.

use std::fs::File;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, Interest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::bufpool::{Buf, BufPool};
use crate::export::{BLKDISCARD, BLKZEROOUT, Backing, Export, ExportStats};
use crate::handshake::{MAX_PAYLOAD, Negotiated};
use crate::io::IoEngine;
use crate::lease::{Binding, ChangeGuard};
use nbd_proto::{ChunkPayload, Extent, ReplyHeader, Request, consts::*, encode_chunk};

/// Permit units per connection, one unit per 64 KiB of payload (48 MiB in all).
const PERMIT_UNITS: u32 = 768;
/// How long a fenced connection keeps answering (changes with NBD_EPERM) before it
/// is closed; safety does not depend on it, the lease gate refuses every change.
const FENCE_GRACE: std::time::Duration = std::time::Duration::from_millis(100);
const UNIT: u64 = 64 << 10;
/// Reads at least this long check for holes first (one lseek) and may be answered
/// with a single OFFSET_HOLE chunk instead of data.
const HOLE_CHECK_MIN: u64 = 64 << 10;
/// Most extents in one block status reply.
const MAX_EXTENTS: usize = 16 << 10;
/// Socket buffers of the reader and writer.
const IO_BUF: usize = 256 << 10;
/// Payloads at least this long are written from their own buffer, not copied.
const DIRECT_WRITE_MIN: usize = 64 << 10;

/// Everything a request handler needs, shared by the connection's tasks.
pub(crate) struct ConnCtx {
    pub export: Arc<Export>,
    pub binding: Binding,
    pub structured: bool,
    pub extended: bool,
    pub base_allocation: Option<u32>,
    pub engine: Arc<IoEngine>,
    pub pool: Arc<BufPool>,
    /// Large reads are sent straight from the file (see [`SENDFILE_MIN`]); set for
    /// files on memory filesystems, where sendfile never waits for a device.
    pub zero_copy: bool,
}

/// One reply, written by the writer task; its permit is released once written.
struct Frame {
    head: Vec<u8>,
    data: Option<Buf>,
    /// Data sent straight from the file by the writer (zero copy), after `head`.
    file: Option<FileRange>,
    _permit: Option<OwnedSemaphorePermit>,
}

struct FileRange {
    file: Arc<File>,
    offset: u64,
    len: usize,
}

/// The write half of a connection: a byte stream that can also send file data
/// without copying it through user space (sendfile).
pub(crate) trait ReplySink: AsyncWrite + Unpin + Send + 'static {
    /// Whether [`ReplySink::send_file`] is zero copy (a plain socket). Through TLS
    /// the bytes must be encrypted in user space anyway: reads are then copied
    /// into buffers like on any other file system.
    const ZERO_COPY: bool = true;

    fn send_file(
        &mut self,
        file: &File,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = io::Result<()>> + Send;
}

macro_rules! sendfile_sink {
    ($t:ty) => {
        impl ReplySink for $t {
            async fn send_file(&mut self, file: &File, offset: u64, len: usize) -> io::Result<()> {
                let sock = self.as_ref();
                let mut off = offset as libc::off_t;
                let mut left = len;
                while left > 0 {
                    sock.writable().await?;
                    let r = sock.try_io(Interest::WRITABLE, || {
                        // SAFETY: both descriptors are open for the call (the socket
                        // by `sock`, the file by `file`); `off` is a live off_t.
                        let n = unsafe {
                            libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &raw mut off, left)
                        };
                        if n < 0 {
                            Err(io::Error::last_os_error())
                        } else {
                            Ok(n as usize)
                        }
                    });
                    match r {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => left -= n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
        }
    };
}

sendfile_sink!(tokio::net::tcp::OwnedWriteHalf);
sendfile_sink!(tokio::net::unix::OwnedWriteHalf);

/// A TLS connection's write half: file data is read and then encrypted.
impl<S> ReplySink for tokio::io::WriteHalf<tokio_rustls::server::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    const ZERO_COPY: bool = false;

    async fn send_file(&mut self, file: &File, offset: u64, len: usize) -> io::Result<()> {
        // Not reached (ZERO_COPY is false, so no reply carries a file range); kept
        // correct for completeness. Only memory file systems get here, where a
        // pread never waits for a device.
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len.min(1 << 20)];
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(buf.len());
            file.read_exact_at(&mut buf[..n], offset + done as u64)?;
            self.write_all(&buf[..n]).await?;
            done += n;
        }
        Ok(())
    }
}

/// Serves one negotiated connection until DISC, a protocol violation, a vanished
/// client, fencing, or server shutdown; in-flight requests finish before it returns.
pub(crate) async fn serve<R, W>(
    reader: R,
    writer: W,
    neg: Negotiated,
    engine: Arc<IoEngine>,
    pool: Arc<BufPool>,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: ReplySink,
{
    // sendfile never waits for a device or fails with a media error only on memory
    // filesystems; elsewhere it could block the writer or fail after the header.
    let neg_zero_copy =
        W::ZERO_COPY && neg.export.backing == Backing::File && neg.export.nowait.memory();
    let ctx = Arc::new(ConnCtx {
        export: neg.export,
        binding: neg.binding,
        structured: neg.structured,
        extended: neg.extended,
        base_allocation: neg.base_allocation,
        engine,
        pool,
        zero_copy: neg_zero_copy,
    });
    let (tx, rx) = mpsc::unbounded_channel::<Out>();
    let writer_failed = CancellationToken::new();
    let writer_task = tokio::spawn(write_loop(writer, rx, writer_failed.clone()));
    let permits = Arc::new(Semaphore::new(PERMIT_UNITS as usize));
    let mut rd = BufReader::with_capacity(IO_BUF, reader);

    let result = {
        let reading = read_loop(&mut rd, &ctx, &tx, &permits);
        tokio::pin!(reading);
        tokio::select! {
        biased;
        _ = shutdown.cancelled() => Ok(()),
        _ = writer_failed.cancelled() => Ok(()),
        _ = ctx.export.lease.fenced(&ctx.binding) => {
            tracing::info!(export = %ctx.export.name, "connection fenced, closing");
            // Answer what the client has already sent: every change now fails with
            // NBD_EPERM in begin_change, which tells the client why, before the close.
            let _ = tokio::time::timeout(FENCE_GRACE, &mut reading).await;
            Ok(())
        }
        _ = ctx.export.removed.cancelled() => {
            // Requests already read finish (their handlers keep running and the
            // writer sends their replies); nothing more is read.
            tracing::info!(export = %ctx.export.name, "export removed, closing connection");
            Ok(())
        }
        r = &mut reading => r,
        }
    };
    // No more requests: once every handler has sent its reply (dropping its sender),
    // the writer drains, flushes and closes the socket.
    drop(tx);
    let _ = writer_task.await;
    result
}

/// Replies travel to the writer one at a time (from handler tasks) or in batches
/// (answered inline by the reader).
enum Out {
    One(Frame),
    Batch(Vec<Frame>),
}

/// Replies the reader answered inline, handed to the writer in one message when
/// the reader is about to wait (or is dropped: nothing answered is ever lost).
struct Batch<'a> {
    frames: Vec<Frame>,
    tx: &'a mpsc::UnboundedSender<Out>,
}

impl Batch<'_> {
    fn flush(&mut self) {
        if !self.frames.is_empty() {
            let _ = self.tx.send(Out::Batch(std::mem::take(&mut self.frames)));
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Largest request answered inline. Larger copies go to the engine's thread, so
/// that they overlap with the connection's socket I/O.
const INLINE_MAX: u64 = 128 << 10;

/// Largest write answered inline. Writes are inlined further than reads: the payload
/// is already in memory, and on memory filesystems (which refuse RWF_NOWAIT, so an
/// io_uring write is punted to a kernel worker) the hand-off cost more than the copy.
/// Measured here with `make bench` (1 MiB QD8 to /dev/shm): 2393 -> 4186-5020 MiB/s.
const WRITE_INLINE_MAX: u64 = 1 << 20;

/// The inline policy for an I/O of `len` bytes (see [`INLINE_MAX`]).
fn inline_for(ctx: &ConnCtx, len: u64) -> Option<&crate::io::NoWait> {
    (len <= INLINE_MAX).then_some(&ctx.export.nowait)
}

/// Largest READ answered inline: on memory filesystems every read below the
/// sendfile size (a copy that never waits); elsewhere [`INLINE_MAX`], tried with
/// RWF_NOWAIT. io_uring cannot read tmpfs without blocking, so it punts such reads
/// to a kernel worker thread: perf showed a third of the server's CPU time in those
/// workers under nbdcopy (256 KiB reads), and reading inline on the connection's
/// thread took nbdcopy from about 2700 to 3000-3300 MiB/s here.
fn read_inline_max(ctx: &ConnCtx) -> u64 {
    if ctx.zero_copy {
        SENDFILE_MIN - 1
    } else {
        INLINE_MAX
    }
}

/// Reads of at least SENDFILE_MIN bytes on memory filesystems are sent with
/// sendfile: the data goes from the page cache to the socket without a copy through
/// user space. Measured here (2 cores, loopback, connections on their own threads,
/// see [`crate::dataplane`]): fio 1 MiB reads at QD8 went from 3600-3900 MiB/s
/// (copy) to 4500-6700 MiB/s; for 256 KiB reads (nbdcopy) the copy was faster, as
/// the reader then pays for receiving thousands of 4 KiB page fragments.
const SENDFILE_MIN: u64 = 1 << 20;

/// Most replies gathered before the reader hands them over anyway.
const MAX_BATCH: usize = 64;

async fn read_loop<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    ctx: &Arc<ConnCtx>,
    tx: &mpsc::UnboundedSender<Out>,
    permits: &Arc<Semaphore>,
) -> io::Result<()> {
    let hl = Request::header_len(ctx.extended);
    let mut hb = [0u8; 32];
    let mut batch = Batch {
        frames: Vec::with_capacity(MAX_BATCH),
        tx,
    };
    loop {
        // Everything already received is answered before we wait for more.
        if rd.buffer().len() < hl {
            batch.flush();
        }
        match rd.read_exact(&mut hb[..hl]).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = match Request::decode(&hb[..hl], ctx.extended) {
            Ok(r) => r,
            Err(e) => {
                // Without a valid header we cannot find the next one: hard disconnect.
                tracing::debug!(error = %e, "bad request header, disconnecting");
                return Ok(());
            }
        };
        ExportStats::add(&ctx.export.stats.requests, 1);
        if req.command == CMD_DISC {
            return Ok(());
        }
        let payload_len = req.payload_len(ctx.extended);
        if payload_len > MAX_PAYLOAD as u64 {
            // We will not buffer it, and skipping gigabytes is no better: answer,
            // then drop the connection (the spec allows a hard disconnect here).
            let errno = if ctx.extended { EOVERFLOW } else { EINVAL };
            let msg = "payload exceeds the 32 MiB maximum";
            batch.frames.push(error_frame(ctx, &req, errno, msg, None));
            return Ok(());
        }
        let read_len = if req.command == CMD_READ {
            req.length.min(MAX_PAYLOAD as u64)
        } else {
            0
        };
        let units = (1 + (payload_len + read_len).div_ceil(UNIT)) as u32;
        let permit = match Arc::clone(permits).try_acquire_many_owned(units) {
            Ok(p) => p,
            Err(_) => {
                // Permits come back as replies are written: hand ours over first.
                batch.flush();
                Arc::clone(permits)
                    .acquire_many_owned(units)
                    .await
                    .map_err(|_| io::Error::other("connection permits closed"))?
            }
        };
        let payload = if payload_len > 0 {
            if (rd.buffer().len() as u64) < payload_len {
                batch.flush();
            }
            let mut buf = ctx.pool.get(payload_len as usize);
            // A client that vanishes mid-payload leaves nothing behind: the write
            // is only submitted once the whole payload is here.
            rd.read_exact(&mut buf).await?;
            Some(buf)
        } else {
            None
        };
        // Fast path: answer in place when no I/O wait is needed.
        let small = req.length <= read_inline_max(ctx);
        let (permit, payload) = match (req.command, payload) {
            (CMD_READ, None) if small => match read_inline(ctx, &req, permit) {
                Ok(f) => {
                    batch.frames.push(f);
                    continue;
                }
                Err(p) => (p, None),
            },
            (CMD_WRITE, Some(buf)) if req.length <= WRITE_INLINE_MAX => {
                match write_inline(ctx, &req, buf, permit) {
                    Ok(f) => {
                        batch.frames.push(f);
                        if batch.frames.len() >= MAX_BATCH {
                            batch.flush();
                        }
                        continue;
                    }
                    Err((buf, p)) => (p, Some(buf)),
                }
            }
            (_, payload) => (permit, payload),
        };
        if batch.frames.len() >= MAX_BATCH {
            batch.flush();
        }
        let ctx = Arc::clone(ctx);
        let tx = tx.clone();
        tokio::spawn(async move {
            let frame = handle(&ctx, req, payload, permit).await;
            let _ = tx.send(Out::One(frame));
        });
    }
}

async fn write_loop<W: ReplySink>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    failed: CancellationToken,
) {
    // Small replies are gathered here; a large payload goes out in one writev
    // together with whatever is gathered and its own header (no copy, and no
    // header alone in its own TCP segment).
    let mut stage: Vec<u8> = Vec::with_capacity(IO_BUF);
    let res: io::Result<()> = async {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(out) = next {
                match out {
                    Out::One(f) => put_frame(&mut w, &mut stage, f).await?,
                    Out::Batch(frames) => {
                        for f in frames {
                            put_frame(&mut w, &mut stage, f).await?;
                        }
                    }
                }
                next = rx.try_recv().ok();
            }
            if !stage.is_empty() {
                w.write_all(&stage).await?;
                stage.clear();
            }
            w.flush().await?;
        }
        w.shutdown().await
    }
    .await;
    if let Err(e) = res {
        tracing::debug!(error = %e, "reply writer stopped");
        failed.cancel();
        // Keep draining so that handlers never block and permits are released.
        while rx.recv().await.is_some() {}
    }
}

/// Stages a small reply, or writes a large one (with what is staged) at once.
async fn put_frame<W: ReplySink>(w: &mut W, stage: &mut Vec<u8>, f: Frame) -> io::Result<()> {
    if let Some(fr) = &f.file {
        write_all_vectored(w, [&stage[..], &f.head[..], &[]]).await?;
        stage.clear();
        w.send_file(&fr.file, fr.offset, fr.len).await?;
        return Ok(());
    }
    match &f.data {
        Some(d) if d.len() >= DIRECT_WRITE_MIN => {
            write_all_vectored(w, [&stage[..], &f.head[..], &d[..]]).await?;
            stage.clear();
        }
        data => {
            stage.extend_from_slice(&f.head);
            if let Some(d) = data {
                stage.extend_from_slice(d);
            }
            if stage.len() >= IO_BUF {
                w.write_all(stage).await?;
                stage.clear();
            }
        }
    }
    // Dropping the frame releases its permit: its bytes are out or copied.
    drop(f);
    Ok(())
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, parts: [&[u8]; 3]) -> io::Result<()> {
    let mut slices = parts.map(IoSlice::new);
    let mut bufs: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Maps an I/O error to the NBD error the spec asks for.
fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::EOPNOTSUPP) => ENOTSUP,
        _ => EIO,
    }
}

fn ok_frame(ctx: &ConnCtx, req: &Request, permit: OwnedSemaphorePermit) -> Frame {
    let mut head = Vec::with_capacity(32);
    if ctx.extended {
        encode_chunk(
            true,
            REPLY_FLAG_DONE,
            req.cookie,
            req.offset,
            &ChunkPayload::None,
            &mut head,
        );
    } else {
        ReplyHeader::Simple {
            error: 0,
            cookie: req.cookie,
        }
        .encode(&mut head);
    }
    Frame {
        head,
        data: None,
        file: None,
        _permit: Some(permit),
    }
}

fn error_frame(
    ctx: &ConnCtx,
    req: &Request,
    errno: u32,
    msg: &str,
    permit: Option<OwnedSemaphorePermit>,
) -> Frame {
    let mut head = Vec::with_capacity(64);
    if ctx.structured {
        let p = ChunkPayload::Error {
            error: errno,
            message: msg.to_owned(),
        };
        encode_chunk(
            ctx.extended,
            REPLY_FLAG_DONE,
            req.cookie,
            req.offset,
            &p,
            &mut head,
        );
    } else {
        ReplyHeader::Simple {
            error: errno,
            cookie: req.cookie,
        }
        .encode(&mut head);
    }
    Frame {
        head,
        data: None,
        file: None,
        _permit: permit,
    }
}

/// Why a request failed: the NBD error and a message for the client's user.
struct Fail(u32, &'static str);

fn check_range(export: &Export, req: &Request, errno: u32) -> Result<(), Fail> {
    match req.offset.checked_add(req.length) {
        Some(end) if end <= export.size => Ok(()),
        _ => Err(Fail(errno, "request beyond the end of the export")),
    }
}

fn check_flags(req: &Request, allowed: u16) -> Result<(), Fail> {
    if req.flags & !allowed != 0 {
        Err(Fail(EINVAL, "flag not valid for this command"))
    } else {
        Ok(())
    }
}

async fn handle(
    ctx: &ConnCtx,
    req: Request,
    payload: Option<Buf>,
    permit: OwnedSemaphorePermit,
) -> Frame {
    let r = match req.command {
        CMD_READ => return read(ctx, req, permit).await,
        CMD_WRITE => write(ctx, &req, payload).await,
        CMD_FLUSH => flush(ctx, &req).await,
        CMD_TRIM => trim(ctx, &req).await,
        CMD_CACHE => cache(ctx, &req),
        CMD_WRITE_ZEROES => write_zeroes(ctx, &req).await,
        CMD_BLOCK_STATUS => return block_status(ctx, req, permit).await,
        _ => Err(Fail(EINVAL, "unknown command")),
    };
    match r {
        Ok(()) => ok_frame(ctx, &req, permit),
        Err(Fail(errno, msg)) => error_frame(ctx, &req, errno, msg, Some(permit)),
    }
}

/// Whether a zeroing step worked; a step refused by a fence ends the request with
/// EPERM instead of falling back to the next method.
fn fenced_is_final(r: io::Result<()>) -> Result<bool, Fail> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if crate::io::is_fenced_error(&e) => Err(Fail(EPERM, FENCED_MSG)),
        Err(_) => Ok(false),
    }
}

fn io_fail(e: &io::Error) -> Fail {
    if crate::io::is_fenced_error(e) {
        return Fail(EPERM, FENCED_MSG);
    }
    let errno = errno_of(e);
    tracing::debug!(error = %e, errno, "I/O error");
    Fail(errno, "I/O error on the export")
}

/// Where a READ stands once validated.
enum ReadStep {
    /// Answered without touching data: an error, an empty read, or a hole.
    Done(Frame),
    /// The data must be read.
    Data(OwnedSemaphorePermit),
}

fn read_prelude(ctx: &ConnCtx, req: &Request, permit: OwnedSemaphorePermit) -> ReadStep {
    let allowed = CMD_FLAG_FUA | if ctx.structured { CMD_FLAG_DF } else { 0 };
    let too_long = if ctx.structured { EOVERFLOW } else { EINVAL };
    let checked = check_flags(req, allowed).and_then(|()| {
        if req.length > MAX_PAYLOAD as u64 {
            return Err(Fail(too_long, "read longer than 32 MiB"));
        }
        check_range(&ctx.export, req, EINVAL)
    });
    if let Err(Fail(errno, msg)) = checked {
        return ReadStep::Done(error_frame(ctx, req, errno, msg, Some(permit)));
    }
    if req.length == 0 {
        if !ctx.structured {
            return ReadStep::Done(ok_frame(ctx, req, permit));
        }
        // With structured replies a READ never gets a simple reply.
        let mut head = Vec::with_capacity(32);
        encode_chunk(
            ctx.extended,
            REPLY_FLAG_DONE,
            req.cookie,
            req.offset,
            &ChunkPayload::None,
            &mut head,
        );
        return ReadStep::Done(Frame {
            head,
            data: None,
            file: None,
            _permit: Some(permit),
        });
    }
    if ctx.structured
        && req.length >= HOLE_CHECK_MIN
        && is_hole(&ctx.export, req.offset, req.length)
    {
        let p = ChunkPayload::OffsetHole {
            offset: req.offset,
            length: req.length as u32,
        };
        let mut head = Vec::with_capacity(48);
        encode_chunk(
            ctx.extended,
            REPLY_FLAG_DONE,
            req.cookie,
            req.offset,
            &p,
            &mut head,
        );
        return ReadStep::Done(Frame {
            head,
            data: None,
            file: None,
            _permit: Some(permit),
        });
    }
    ReadStep::Data(permit)
}

fn read_data_frame(ctx: &ConnCtx, req: &Request, buf: Buf, permit: OwnedSemaphorePermit) -> Frame {
    ExportStats::add(&ctx.export.stats.bytes_read, buf.len() as u64);
    let mut head = Vec::with_capacity(48);
    if ctx.structured {
        let p = ChunkPayload::OffsetData {
            offset: req.offset,
            data_len: buf.len() as u64,
        };
        encode_chunk(
            ctx.extended,
            REPLY_FLAG_DONE,
            req.cookie,
            req.offset,
            &p,
            &mut head,
        );
    } else {
        ReplyHeader::Simple {
            error: 0,
            cookie: req.cookie,
        }
        .encode(&mut head);
    }
    Frame {
        head,
        data: Some(buf),
        file: None,
        _permit: Some(permit),
    }
}

/// Answers a READ without leaving the reader task when no I/O wait is needed
/// (errors, holes, data in the page cache); gives the permit back otherwise.
fn read_inline(
    ctx: &ConnCtx,
    req: &Request,
    permit: OwnedSemaphorePermit,
) -> Result<Frame, OwnedSemaphorePermit> {
    let permit = match read_prelude(ctx, req, permit) {
        ReadStep::Done(f) => return Ok(f),
        ReadStep::Data(p) => p,
    };
    let mut buf = ctx.pool.get(req.length as usize);
    let mut pos = 0;
    match ctx
        .export
        .nowait
        .read(&ctx.export.file, req.offset, &mut buf, &mut pos)
    {
        Err(e) => {
            let Fail(errno, msg) = io_fail(&e);
            Ok(error_frame(ctx, req, errno, msg, Some(permit)))
        }
        Ok(()) if pos == buf.len() => Ok(read_data_frame(ctx, req, buf, permit)),
        Ok(()) => Err(permit),
    }
}

async fn read(ctx: &ConnCtx, req: Request, permit: OwnedSemaphorePermit) -> Frame {
    let permit = match read_prelude(ctx, &req, permit) {
        ReadStep::Done(f) => return f,
        ReadStep::Data(p) => p,
    };
    if ctx.zero_copy && req.length >= SENDFILE_MIN {
        let len = req.length as usize;
        let mut f = read_data_frame(ctx, &req, Buf::default(), permit);
        ExportStats::add(&ctx.export.stats.bytes_read, len as u64);
        // The header must announce the real length: rebuild it for `len` bytes.
        f.head.clear();
        if ctx.structured {
            let p = ChunkPayload::OffsetData {
                offset: req.offset,
                data_len: len as u64,
            };
            encode_chunk(
                ctx.extended,
                REPLY_FLAG_DONE,
                req.cookie,
                req.offset,
                &p,
                &mut f.head,
            );
        } else {
            ReplyHeader::Simple {
                error: 0,
                cookie: req.cookie,
            }
            .encode(&mut f.head);
        }
        f.data = None;
        f.file = Some(FileRange {
            file: Arc::clone(&ctx.export.file),
            offset: req.offset,
            len,
        });
        return f;
    }
    let buf = ctx.pool.get(req.length as usize);
    let (buf, r) = ctx
        .engine
        .read_exact(
            &ctx.export.file,
            inline_for(ctx, req.length),
            req.offset,
            buf,
        )
        .await;
    match r {
        Ok(()) => read_data_frame(ctx, &req, buf, permit),
        Err(e) => {
            let Fail(errno, msg) = io_fail(&e);
            error_frame(ctx, &req, errno, msg, Some(permit))
        }
    }
}

/// True when every block of the export's file is allocated, so it has no hole to
/// look for. fstat is far cheaper than lseek(SEEK_DATA/SEEK_HOLE), which takes the
/// inode lock on tmpfs (every connection to the export contends for it) and walks
/// the page cache page by page: perf showed the lseeks at 7-9 % of the server's CPU
/// time under nbdcopy. Blocks preallocated past the end (fallocate KEEP_SIZE) could
/// make a sparse file look full; that only reports a hole as data, which the spec
/// allows (a hole may always be described as data).
fn fully_allocated(export: &Export) -> bool {
    // SAFETY: stat is plain data; all-zero is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is live and writable; the descriptor is open for the call.
    let r = unsafe { libc::fstat(export.file.as_raw_fd(), &raw mut st) };
    r == 0 && (st.st_blocks as u64).saturating_mul(512) >= st.st_size as u64
}

/// True when `[offset, offset+len)` of a regular file is one hole. One lseek: a
/// metadata lookup that does not wait for data I/O, so it runs inline.
fn is_hole(export: &Export, offset: u64, len: u64) -> bool {
    if export.backing != Backing::File {
        return false;
    }
    if fully_allocated(export) {
        return false;
    }
    // SAFETY: plain syscall on a descriptor kept open by `export.file`.
    let data = unsafe { libc::lseek(export.file.as_raw_fd(), offset as i64, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data at or after offset. Anything else: we do not know.
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    data as u64 >= offset + len
}

fn writable(ctx: &ConnCtx) -> Result<(), Fail> {
    if ctx.export.read_only || !ctx.binding.writable {
        return Err(Fail(EPERM, "export is read-only for this connection"));
    }
    Ok(())
}

fn write_checks(ctx: &ConnCtx, req: &Request) -> Result<(), Fail> {
    check_flags(req, CMD_FLAG_FUA)?;
    writable(ctx)?;
    check_range(&ctx.export, req, ENOSPC)
}

/// Answers a plain (non-FUA) WRITE inline when the page cache takes it without
/// waiting; gives payload and permit back otherwise.
fn write_inline(
    ctx: &ConnCtx,
    req: &Request,
    payload: Buf,
    permit: OwnedSemaphorePermit,
) -> Result<Frame, (Buf, OwnedSemaphorePermit)> {
    if req.flags & CMD_FLAG_FUA != 0 {
        return Err((payload, permit));
    }
    if let Err(Fail(errno, msg)) = write_checks(ctx, req) {
        return Ok(error_frame(ctx, req, errno, msg, Some(permit)));
    }
    // Admitted and issued in one go, on this task, right below.
    let Ok(_guard) = ctx.export.lease.begin_change(&ctx.binding) else {
        return Ok(error_frame(ctx, req, EPERM, FENCED_MSG, Some(permit)));
    };
    let mut pos = 0;
    match ctx
        .export
        .nowait
        .write(&ctx.export.file, req.offset, &payload, &mut pos)
    {
        Err(e) => {
            let Fail(errno, msg) = io_fail(&e);
            Ok(error_frame(ctx, req, errno, msg, Some(permit)))
        }
        Ok(()) if pos == payload.len() => {
            ExportStats::add(&ctx.export.stats.bytes_written, pos as u64);
            Ok(ok_frame(ctx, req, permit))
        }
        Ok(()) => Err((payload, permit)),
    }
}

/// Admits one change (one write, fallocate or ioctl) under the connection's lease.
/// The guard goes with the change to the I/O backend, which re-checks the epoch
/// right before the kernel sees it and releases the guard when the kernel is done.
fn change(ctx: &ConnCtx) -> Result<ChangeGuard, Fail> {
    ctx.export
        .lease
        .begin_change(&ctx.binding)
        .map_err(|_| Fail(EPERM, FENCED_MSG))
}

const FENCED_MSG: &str = "write lease fenced";

async fn write(ctx: &ConnCtx, req: &Request, payload: Option<Buf>) -> Result<(), Fail> {
    write_checks(ctx, req)?;
    let buf = payload.unwrap_or_default();
    let guard = change(ctx)?;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let n = buf.len() as u64;
    let (_buf, r) = ctx
        .engine
        .write_all(
            &ctx.export.file,
            inline_for(ctx, n),
            req.offset,
            buf,
            fua,
            guard,
        )
        .await;
    r.map_err(|e| io_fail(&e))?;
    ExportStats::add(&ctx.export.stats.bytes_written, n);
    Ok(())
}

async fn flush(ctx: &ConnCtx, req: &Request) -> Result<(), Fail> {
    check_flags(req, CMD_FLAG_FUA)?;
    ctx.engine
        .sync_data(&ctx.export.file)
        .await
        .map_err(|e| io_fail(&e))
}

fn cache(ctx: &ConnCtx, req: &Request) -> Result<(), Fail> {
    check_flags(req, CMD_FLAG_FUA)?;
    check_range(&ctx.export, req, EINVAL)?;
    // SAFETY: plain syscall on an open descriptor; advice only, never blocks on I/O.
    unsafe {
        libc::posix_fadvise(
            ctx.export.file.as_raw_fd(),
            req.offset as i64,
            req.length as i64,
            libc::POSIX_FADV_WILLNEED,
        )
    };
    Ok(())
}

async fn trim(ctx: &ConnCtx, req: &Request) -> Result<(), Fail> {
    check_flags(req, CMD_FLAG_FUA)?;
    writable(ctx)?;
    check_range(&ctx.export, req, EINVAL)?;
    if req.length == 0 {
        return Ok(());
    }
    let guard = change(ctx)?;
    let r = match ctx.export.backing {
        Backing::File => {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            ctx.engine
                .fallocate(&ctx.export.file, mode, req.offset, req.length, guard)
                .await
        }
        Backing::BlockDevice => {
            blk_range_ioctl(&ctx.export, BLKDISCARD, req.offset, req.length, guard).await
        }
    };
    // TRIM is advisory: a backing store that cannot discard simply keeps the data.
    if let Err(e) = r
        && e.raw_os_error() != Some(libc::EOPNOTSUPP)
    {
        return Err(io_fail(&e));
    }
    if req.flags & CMD_FLAG_FUA != 0 {
        ctx.engine
            .sync_data(&ctx.export.file)
            .await
            .map_err(|e| io_fail(&e))?;
    }
    Ok(())
}

async fn blk_range_ioctl(
    export: &Export,
    op: libc::c_ulong,
    offset: u64,
    len: u64,
    guard: ChangeGuard,
) -> io::Result<()> {
    let file = Arc::clone(&export.file);
    tokio::task::spawn_blocking(move || {
        // The lease re-check right before the ioctl; the guard is released when
        // the closure returns, once the kernel is done.
        if !guard.may_issue() {
            return Err(crate::io::fenced_error());
        }
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read two u64 through the pointer, which is live.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), op, range.as_ptr()) };
        let res = if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        };
        drop(guard);
        res
    })
    .await
    .map_err(io::Error::other)?
}

async fn write_zeroes(ctx: &ConnCtx, req: &Request) -> Result<(), Fail> {
    check_flags(req, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO)?;
    writable(ctx)?;
    check_range(&ctx.export, req, ENOSPC)?;
    if req.length == 0 {
        return Ok(());
    }
    // Every step below is a change of its own, admitted (and re-checked before
    // issue) separately: a fence between two steps fails the rest with EPERM.
    let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
    let may_punch = req.flags & CMD_FLAG_NO_HOLE == 0;
    let file = &ctx.export.file;
    let mut done = false;
    match ctx.export.backing {
        Backing::File => {
            let keep = libc::FALLOC_FL_KEEP_SIZE;
            if may_punch {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | keep;
                let r = ctx
                    .engine
                    .fallocate(file, mode, req.offset, req.length, change(ctx)?)
                    .await;
                done = fenced_is_final(r)?;
            }
            if !done {
                let mode = libc::FALLOC_FL_ZERO_RANGE | keep;
                let r = ctx
                    .engine
                    .fallocate(file, mode, req.offset, req.length, change(ctx)?)
                    .await;
                done = fenced_is_final(r)?;
            }
        }
        // BLKZEROOUT may itself write every byte, so it never counts as fast.
        Backing::BlockDevice if !fast => {
            let r = blk_range_ioctl(
                &ctx.export,
                BLKZEROOUT,
                req.offset,
                req.length,
                change(ctx)?,
            )
            .await;
            done = fenced_is_final(r)?;
        }
        Backing::BlockDevice => {}
    }
    if !done {
        if fast {
            return Err(Fail(ENOTSUP, "zeroing would not be fast"));
        }
        write_zero_bytes(ctx, req.offset, req.length).await?;
    }
    if req.flags & CMD_FLAG_FUA != 0 {
        ctx.engine.sync_data(file).await.map_err(|e| io_fail(&e))?;
    }
    Ok(())
}

/// The slow path: write zero bytes, 1 MiB at a time.
async fn write_zero_bytes(ctx: &ConnCtx, offset: u64, len: u64) -> Result<(), Fail> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = ctx.pool.get(len.min(CHUNK) as usize);
    buf.fill(0);
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(CHUNK) as usize;
        buf.truncate(n);
        let (b, r) = ctx
            .engine
            .write_all(
                &ctx.export.file,
                inline_for(ctx, n as u64),
                offset + pos,
                buf,
                false,
                change(ctx)?,
            )
            .await;
        buf = b;
        r.map_err(|e| io_fail(&e))?;
        pos += n as u64;
    }
    Ok(())
}

async fn block_status(ctx: &ConnCtx, req: Request, permit: OwnedSemaphorePermit) -> Frame {
    let checked = check_flags(&req, CMD_FLAG_REQ_ONE | CMD_FLAG_FUA)
        .and_then(|_| {
            ctx.base_allocation
                .ok_or(Fail(EINVAL, "no meta context was negotiated"))
        })
        .and_then(|id| {
            if req.length == 0 {
                return Err(Fail(EINVAL, "empty block status request"));
            }
            check_range(&ctx.export, &req, EINVAL).map(|_| id)
        });
    let id = match checked {
        Ok(id) => id,
        Err(Fail(errno, msg)) => return error_frame(ctx, &req, errno, msg, Some(permit)),
    };
    let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    };
    // Compact replies carry 32-bit extent lengths.
    let max_len = if ctx.extended {
        u64::MAX
    } else {
        u32::MAX as u64 & !0xfff
    };
    let export = Arc::clone(&ctx.export);
    let (offset, length) = (req.offset, req.length);
    let extents = match extents_without_lseek(&export, offset, length, max, max_len) {
        // No lseek needed: answered inline.
        Some(e) => Ok(Ok(e)),
        None => {
            tokio::task::spawn_blocking(move || seek_extents(&export, offset, length, max, max_len))
                .await
        }
    };
    let extents = match extents {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            let Fail(errno, msg) = io_fail(&e);
            return error_frame(ctx, &req, errno, msg, Some(permit));
        }
        Err(_) => return error_frame(ctx, &req, EIO, "block status task failed", Some(permit)),
    };
    let p = ChunkPayload::BlockStatus {
        context_id: id,
        wide: ctx.extended,
        extents,
    };
    let mut head = Vec::with_capacity(32);
    ReplyHeader::Chunk {
        extended: ctx.extended,
        flags: REPLY_FLAG_DONE,
        chunk_type: p.chunk_type(),
        cookie: req.cookie,
        offset: req.offset,
        length: p.wire_len(),
    }
    .encode(&mut head);
    let mut data = ctx.pool.get(0);
    p.encode(data.as_vec_mut());
    Frame {
        head,
        data: Some(data),
        file: None,
        _permit: Some(permit),
    }
}

/// The extents of a range that is all data (a block device, or a file with every
/// block allocated), without any lseek; None when the file may have holes.
fn extents_without_lseek(
    export: &Export,
    offset: u64,
    length: u64,
    max: usize,
    max_len: u64,
) -> Option<Vec<Extent>> {
    if export.backing == Backing::File && !fully_allocated(export) {
        return None;
    }
    let end = offset + length;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < max {
        let n = (end - pos).min(max_len);
        out.push(Extent {
            length: n,
            flags: 0,
        });
        pos += n;
    }
    Some(out)
}

/// base:allocation extents of a file that may have holes, via SEEK_DATA/SEEK_HOLE:
/// holes are HOLE|ZERO, data is 0, adjacent extents of one kind merged. It may wait
/// on the inode lock, so the data path runs it on a blocking thread, and only when
/// [`extents_without_lseek`] cannot answer.
fn seek_extents(
    export: &Export,
    offset: u64,
    length: u64,
    max: usize,
    max_len: u64,
) -> io::Result<Vec<Extent>> {
    let end = offset + length;
    let mut out: Vec<Extent> = Vec::new();
    let push = |out: &mut Vec<Extent>, len: u64, flags: u32| {
        if let Some(last) = out.last_mut()
            && last.flags == flags
            && last.length + len <= max_len
        {
            last.length += len;
            return;
        }
        out.push(Extent {
            length: len.min(max_len),
            flags,
        });
    };
    let fd = export.file.as_raw_fd();
    let mut pos = offset;
    let hole = STATE_HOLE | STATE_ZERO;
    while pos < end && out.len() < max {
        // SAFETY: plain syscall on an open descriptor.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        let data = if data < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => end,
                // No SEEK_DATA support: report everything as data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    push(&mut out, (end - pos).min(max_len), 0);
                    break;
                }
                _ => return Err(io::Error::last_os_error()),
            }
        } else {
            data as u64
        };
        if data > pos {
            let n = (data.min(end) - pos).min(max_len);
            push(&mut out, n, hole);
            pos += n;
            continue;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_HOLE) };
        let h = if h < 0 { end } else { (h as u64).max(pos + 1) };
        let n = (h.min(end) - pos).min(max_len);
        push(&mut out, n, 0);
        pos += n;
    }
    if max == 1 {
        out.truncate(1);
    }
    Ok(out)
}

/// Exposed for the server's stats.
pub(crate) fn count_connection(export: &Export, delta: i64) {
    if delta >= 0 {
        export
            .stats
            .connections
            .fetch_add(delta as u64, Ordering::Relaxed);
    } else {
        export
            .stats
            .connections
            .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What BLOCK_STATUS answers for a range: without lseek when it can, else by seeking.
    fn allocation_extents(
        export: &Export,
        offset: u64,
        length: u64,
        max: usize,
        max_len: u64,
    ) -> io::Result<Vec<Extent>> {
        match extents_without_lseek(export, offset, length, max, max_len) {
            Some(e) => Ok(e),
            None => seek_extents(export, offset, length, max, max_len),
        }
    }
    use crate::export::ExportSpec;
    use std::io::Write;

    #[test]
    fn extents_follow_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.img");
        let mut f = std::fs::File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&vec![1u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let spec = ExportSpec {
            name: "s".into(),
            path: p,
            read_only: true,
            unleased: true,
            lease_reads: false,
            description: None,
        };
        let e = Export::open(&spec).unwrap();
        let ext = allocation_extents(&e, 0, 4 << 20, 100, u64::MAX).unwrap();
        let total: u64 = ext.iter().map(|x| x.length).sum();
        assert_eq!(total, 4 << 20);
        // Filesystems may round allocation, but the written MiB must be data and
        // the start must be a hole.
        assert_eq!(ext[0].flags, STATE_HOLE | STATE_ZERO);
        let mut pos = 0;
        for x in &ext {
            if pos <= (1 << 20) && pos + x.length >= (2 << 20) {
                assert_eq!(x.flags, 0);
            }
            pos += x.length;
        }
        let one = allocation_extents(&e, 0, 4 << 20, 1, u64::MAX).unwrap();
        assert_eq!(one.len(), 1);
        assert!(is_hole(&e, 0, 64 << 10));
        assert!(!is_hole(&e, 1 << 20, 64 << 10));
    }

    #[test]
    fn fully_allocated_file_is_one_data_extent_without_lseek() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("full.img");
        std::fs::write(&p, vec![7u8; 3 << 20]).unwrap();
        let spec = ExportSpec {
            name: "f".into(),
            path: p.clone(),
            read_only: false,
            unleased: true,
            lease_reads: false,
            description: None,
        };
        let e = Export::open(&spec).unwrap();
        assert!(fully_allocated(&e));
        let ext = allocation_extents(&e, 4096, (3 << 20) - 4096, 100, u64::MAX).unwrap();
        assert_eq!(ext.len(), 1);
        assert_eq!((ext[0].length, ext[0].flags), ((3 << 20) - 4096, 0));
        // Extents longer than a compact reply can carry are split, up to `max`.
        let split = allocation_extents(&e, 0, 3 << 20, 2, 1 << 20).unwrap();
        assert_eq!(split.len(), 2);
        assert!(split.iter().all(|x| x.length == 1 << 20 && x.flags == 0));
        assert!(!is_hole(&e, 0, 1 << 20));
        // Punching a hole makes the file sparse again: the hole is found.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        // SAFETY: plain syscall on the open descriptor.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                1 << 20,
            )
        };
        assert_eq!(r, 0);
        assert!(!fully_allocated(&e));
        assert!(is_hole(&e, 0, 64 << 10));
        let ext = allocation_extents(&e, 0, 3 << 20, 100, u64::MAX).unwrap();
        assert_eq!(ext[0].flags, STATE_HOLE | STATE_ZERO);
    }
}
