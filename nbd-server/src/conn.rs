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

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::bufpool::{Buf, BufPool};
use crate::codec::{ChunkPayload, Extent, ReplyHeader, Request, consts::*, encode_chunk};
use crate::export::{BLKDISCARD, BLKZEROOUT, Backing, Export, ExportStats};
use crate::handshake::{MAX_PAYLOAD, Negotiated};
use crate::io::IoEngine;
use crate::lease::Binding;

/// Permit units per connection, one unit per 64 KiB of payload (48 MiB in all).
const PERMIT_UNITS: u32 = 768;
const UNIT: u64 = 64 << 10;
/// Reads at least this long check for holes first (one lseek) and may be answered
/// with a single OFFSET_HOLE chunk instead of data.
const HOLE_CHECK_MIN: u64 = 64 << 10;
/// Most extents in one block status reply.
const MAX_EXTENTS: usize = 16 << 10;
/// Socket buffers of the reader and writer.
const IO_BUF: usize = 256 << 10;

/// Everything a request handler needs, shared by the connection's tasks.
pub(crate) struct ConnCtx {
    pub export: Arc<Export>,
    pub binding: Binding,
    pub structured: bool,
    pub extended: bool,
    pub base_allocation: Option<u32>,
    pub engine: Arc<IoEngine>,
    pub pool: Arc<BufPool>,
}

/// One reply, written by the writer task; its permit is released once written.
struct Frame {
    head: Vec<u8>,
    data: Option<Buf>,
    _permit: Option<OwnedSemaphorePermit>,
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
    W: AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(ConnCtx {
        export: neg.export,
        binding: neg.binding,
        structured: neg.structured,
        extended: neg.extended,
        base_allocation: neg.base_allocation,
        engine,
        pool,
    });
    let (tx, rx) = mpsc::unbounded_channel::<Frame>();
    let writer_failed = CancellationToken::new();
    let writer_task = tokio::spawn(write_loop(writer, rx, writer_failed.clone()));
    let permits = Arc::new(Semaphore::new(PERMIT_UNITS as usize));
    let mut rd = BufReader::with_capacity(IO_BUF, reader);

    let result = tokio::select! {
        biased;
        _ = shutdown.cancelled() => Ok(()),
        _ = writer_failed.cancelled() => Ok(()),
        _ = ctx.export.lease.fenced(&ctx.binding) => {
            tracing::info!(export = %ctx.export.name, "connection fenced, closing");
            Ok(())
        }
        r = read_loop(&mut rd, &ctx, &tx, &permits) => r,
    };
    // No more requests: once every handler has sent its reply (dropping its sender),
    // the writer drains, flushes and closes the socket.
    drop(tx);
    let _ = writer_task.await;
    result
}

async fn read_loop<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    ctx: &Arc<ConnCtx>,
    tx: &mpsc::UnboundedSender<Frame>,
    permits: &Arc<Semaphore>,
) -> io::Result<()> {
    let hl = Request::header_len(ctx.extended);
    let mut hb = [0u8; 32];
    loop {
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
            let _ = tx.send(error_frame(
                ctx,
                &req,
                errno,
                "payload exceeds the 32 MiB maximum",
                None,
            ));
            return Ok(());
        }
        let read_len = if req.command == CMD_READ {
            req.length.min(MAX_PAYLOAD as u64)
        } else {
            0
        };
        let units = (1 + (payload_len + read_len).div_ceil(UNIT)) as u32;
        let permit = Arc::clone(permits)
            .acquire_many_owned(units)
            .await
            .map_err(|_| io::Error::other("connection permits closed"))?;
        let payload = if payload_len > 0 {
            let mut buf = ctx.pool.get(payload_len as usize);
            // A client that vanishes mid-payload leaves nothing behind: the write
            // is only submitted once the whole payload is here.
            rd.read_exact(&mut buf).await?;
            Some(buf)
        } else {
            None
        };
        let ctx = Arc::clone(ctx);
        let tx = tx.clone();
        tokio::spawn(async move {
            let frame = handle(&ctx, req, payload, permit).await;
            let _ = tx.send(frame);
        });
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Frame>,
    failed: CancellationToken,
) {
    let mut w = BufWriter::with_capacity(IO_BUF, writer);
    let res: io::Result<()> = async {
        while let Some(f) = rx.recv().await {
            write_frame(&mut w, f).await?;
            while let Ok(f) = rx.try_recv() {
                write_frame(&mut w, f).await?;
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

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, f: Frame) -> io::Result<()> {
    w.write_all(&f.head).await?;
    if let Some(d) = &f.data {
        w.write_all(d).await?;
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

fn io_fail(e: &io::Error) -> Fail {
    let errno = errno_of(e);
    tracing::debug!(error = %e, errno, "I/O error");
    Fail(errno, "I/O error on the export")
}

async fn read(ctx: &ConnCtx, req: Request, permit: OwnedSemaphorePermit) -> Frame {
    let allowed = CMD_FLAG_FUA | if ctx.structured { CMD_FLAG_DF } else { 0 };
    let checked = check_flags(&req, allowed)
        .and_then(|_| check_range(&ctx.export, &req, EINVAL))
        .and_then(|_| {
            if req.length > MAX_PAYLOAD as u64 {
                Err(Fail(
                    if ctx.structured { EOVERFLOW } else { EINVAL },
                    "read longer than 32 MiB",
                ))
            } else {
                Ok(())
            }
        });
    if let Err(Fail(errno, msg)) = checked {
        return error_frame(ctx, &req, errno, msg, Some(permit));
    }
    let len = req.length as usize;
    let mut head = Vec::with_capacity(48);
    if len == 0 {
        if !ctx.structured {
            return ok_frame(ctx, &req, permit);
        }
        // With structured replies a READ never gets a simple reply.
        encode_chunk(
            ctx.extended,
            REPLY_FLAG_DONE,
            req.cookie,
            req.offset,
            &ChunkPayload::None,
            &mut head,
        );
        return Frame {
            head,
            data: None,
            _permit: Some(permit),
        };
    }
    if ctx.structured
        && req.length >= HOLE_CHECK_MIN
        && is_hole(&ctx.export, req.offset, req.length)
    {
        let p = ChunkPayload::OffsetHole {
            offset: req.offset,
            length: len as u32,
        };
        encode_chunk(
            ctx.extended,
            REPLY_FLAG_DONE,
            req.cookie,
            req.offset,
            &p,
            &mut head,
        );
        return Frame {
            head,
            data: None,
            _permit: Some(permit),
        };
    }
    let (buf, r) = ctx
        .engine
        .read_exact(&ctx.export.file, req.offset, ctx.pool.get(len))
        .await;
    if let Err(e) = r {
        let Fail(errno, msg) = io_fail(&e);
        return error_frame(ctx, &req, errno, msg, Some(permit));
    }
    ExportStats::add(&ctx.export.stats.bytes_read, len as u64);
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
        _permit: Some(permit),
    }
}

/// True when `[offset, offset+len)` of a regular file is one hole. One lseek: a
/// metadata lookup that does not wait for data I/O, so it runs inline.
fn is_hole(export: &Export, offset: u64, len: u64) -> bool {
    if export.backing != Backing::File {
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

async fn write(ctx: &ConnCtx, req: &Request, payload: Option<Buf>) -> Result<(), Fail> {
    check_flags(req, CMD_FLAG_FUA)?;
    writable(ctx)?;
    check_range(&ctx.export, req, ENOSPC)?;
    let buf = payload.unwrap_or_default();
    let _guard = ctx
        .export
        .lease
        .begin_change(&ctx.binding)
        .map_err(|_| Fail(EPERM, "write lease fenced"))?;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let n = buf.len() as u64;
    let (_buf, r) = ctx
        .engine
        .write_all(&ctx.export.file, req.offset, buf, fua)
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
    let _guard = ctx
        .export
        .lease
        .begin_change(&ctx.binding)
        .map_err(|_| Fail(EPERM, "write lease fenced"))?;
    let r = match ctx.export.backing {
        Backing::File => {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            ctx.engine
                .fallocate(&ctx.export.file, mode, req.offset, req.length)
                .await
        }
        Backing::BlockDevice => {
            blk_range_ioctl(&ctx.export, BLKDISCARD, req.offset, req.length).await
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
) -> io::Result<()> {
    let file = Arc::clone(&export.file);
    tokio::task::spawn_blocking(move || {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read two u64 through the pointer, which is live.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), op, range.as_ptr()) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
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
    let _guard = ctx
        .export
        .lease
        .begin_change(&ctx.binding)
        .map_err(|_| Fail(EPERM, "write lease fenced"))?;
    let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
    let may_punch = req.flags & CMD_FLAG_NO_HOLE == 0;
    let file = &ctx.export.file;
    let mut done = false;
    match ctx.export.backing {
        Backing::File => {
            let keep = libc::FALLOC_FL_KEEP_SIZE;
            if may_punch {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | keep;
                done = ctx
                    .engine
                    .fallocate(file, mode, req.offset, req.length)
                    .await
                    .is_ok();
            }
            if !done {
                let mode = libc::FALLOC_FL_ZERO_RANGE | keep;
                done = ctx
                    .engine
                    .fallocate(file, mode, req.offset, req.length)
                    .await
                    .is_ok();
            }
        }
        // BLKZEROOUT may itself write every byte, so it never counts as fast.
        Backing::BlockDevice if !fast => {
            done = blk_range_ioctl(&ctx.export, BLKZEROOUT, req.offset, req.length)
                .await
                .is_ok();
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
            .write_all(&ctx.export.file, offset + pos, buf, false)
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
    let extents = tokio::task::spawn_blocking(move || {
        allocation_extents(&export, offset, length, max, max_len)
    })
    .await;
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
        _permit: Some(permit),
    }
}

/// base:allocation extents of `[offset, offset+length)` via SEEK_DATA/SEEK_HOLE:
/// holes are HOLE|ZERO, data is 0. Adjacent extents of one kind are merged.
pub(crate) fn allocation_extents(
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
    if export.backing != Backing::File {
        push(&mut out, length.min(max_len), 0);
        return Ok(out);
    }
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
}
