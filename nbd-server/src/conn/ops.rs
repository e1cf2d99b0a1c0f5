//! The request handlers: checks, reads, writes, flush, cache, trim and zeroes.

use super::*;
use crate::mirror;

/// Maps an I/O error to the NBD error the spec asks for.
pub(super) fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::EOPNOTSUPP) => ENOTSUP,
        _ => EIO,
    }
}

pub(super) fn ok_frame(ctx: &ConnCtx, req: &Request, permit: OwnedSemaphorePermit) -> Frame {
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

pub(super) fn error_frame(
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
pub(super) struct Fail(pub(super) u32, pub(super) &'static str);

pub(super) fn check_range(export: &Export, req: &Request, errno: u32) -> Result<(), Fail> {
    match req.offset.checked_add(req.length) {
        Some(end) if end <= export.size => Ok(()),
        _ => Err(Fail(errno, "request beyond the end of the export")),
    }
}

pub(super) fn check_flags(req: &Request, allowed: u16) -> Result<(), Fail> {
    if req.flags & !allowed != 0 {
        Err(Fail(EINVAL, "flag not valid for this command"))
    } else {
        Ok(())
    }
}

pub(super) async fn handle(
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
pub(super) fn fenced_is_final(r: io::Result<()>) -> Result<bool, Fail> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if crate::io::is_fenced_error(&e) => Err(Fail(EPERM, FENCED_MSG)),
        Err(_) => Ok(false),
    }
}

pub(super) fn io_fail(e: &io::Error) -> Fail {
    if crate::io::is_fenced_error(e) {
        return Fail(EPERM, FENCED_MSG);
    }
    let errno = errno_of(e);
    tracing::debug!(error = %e, errno, "I/O error");
    Fail(errno, "I/O error on the export")
}

/// Where a READ stands once validated.
pub(super) enum ReadStep {
    /// Answered without touching data: an error, an empty read, or a hole.
    Done(Frame),
    /// The data must be read.
    Data(OwnedSemaphorePermit),
}

pub(super) fn read_prelude(ctx: &ConnCtx, req: &Request, permit: OwnedSemaphorePermit) -> ReadStep {
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

pub(super) fn read_data_frame(
    ctx: &ConnCtx,
    req: &Request,
    buf: Buf,
    permit: OwnedSemaphorePermit,
) -> Frame {
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
pub(super) fn read_inline(
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

pub(super) async fn read(ctx: &ConnCtx, req: Request, permit: OwnedSemaphorePermit) -> Frame {
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

pub(super) fn writable(ctx: &ConnCtx) -> Result<(), Fail> {
    if ctx.export.read_only || !ctx.binding.writable {
        return Err(Fail(EPERM, "export is read-only for this connection"));
    }
    Ok(())
}

pub(super) fn write_checks(ctx: &ConnCtx, req: &Request) -> Result<(), Fail> {
    check_flags(req, CMD_FLAG_FUA)?;
    writable(ctx)?;
    check_range(&ctx.export, req, ENOSPC)
}

/// Answers a plain (non-FUA) WRITE inline when the page cache takes it without
/// waiting; gives payload and permit back otherwise.
pub(super) fn write_inline(
    ctx: &ConnCtx,
    req: &Request,
    payload: Buf,
    permit: OwnedSemaphorePermit,
) -> Result<Frame, (Buf, OwnedSemaphorePermit)> {
    // FUA, or a write-blocking mirror job (it waits for the target): not inline.
    if req.flags & CMD_FLAG_FUA != 0 || ctx.export.mirrors.blocks_writes() {
        return Err((payload, permit));
    }
    if let Err(Fail(errno, msg)) = write_checks(ctx, req) {
        return Ok(error_frame(ctx, req, errno, msg, Some(permit)));
    }
    let _landing = ctx.export.inflight.begin(req.offset, req.length);
    // A region not yet in a bitmap's activity log needs an fdatasync first: not here.
    if !ctx.export.bitmaps.mark_fast(req.offset, req.length) {
        return Err((payload, permit));
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
            ctx.export.mirrors.note(req.offset, payload.len() as u64);
            let Fail(errno, msg) = io_fail(&e);
            Ok(error_frame(ctx, req, errno, msg, Some(permit)))
        }
        Ok(()) if pos == payload.len() => {
            ExportStats::add(&ctx.export.stats.bytes_written, pos as u64);
            ctx.export.mirrors.note(req.offset, pos as u64);
            Ok(ok_frame(ctx, req, permit))
        }
        Ok(()) => Err((payload, permit)),
    }
}

/// Writes a payload that sits in the connection's pipe (see `splice.rs`) into the
/// file, on this task: only on memory filesystems, where that never waits for a
/// device (a dirty bitmap's activity-log fdatasync, when one is due, runs on a
/// blocking thread first). The pipe is empty afterwards; an error here means it
/// could not be emptied and the connection must end.
pub(super) async fn write_piped(
    ctx: &ConnCtx,
    req: &Request,
    pipe: &super::splice::Pipe,
    permit: OwnedSemaphorePermit,
) -> io::Result<Frame> {
    let len = req.length as usize;
    let _landing = ctx.export.inflight.begin(req.offset, req.length);
    let checked = match write_checks(ctx, req) {
        Ok(()) => mark_dirty(ctx, req.offset, len as u64).await,
        Err(f) => Err(f),
    };
    if let Err(Fail(errno, msg)) = checked {
        pipe.discard(len)?;
        return Ok(error_frame(ctx, req, errno, msg, Some(permit)));
    }
    // Admitted and issued in one go, on this task, right below.
    let Ok(_guard) = ctx.export.lease.begin_change(&ctx.binding) else {
        pipe.discard(len)?;
        return Ok(error_frame(ctx, req, EPERM, FENCED_MSG, Some(permit)));
    };
    let r = pipe.to_file(&ctx.export.file, req.offset, len);
    // Landed (or maybe partly): mirror jobs copy the range (the receive path did not
    // splice while a job blocks writes, see `read_loop`).
    ctx.export.mirrors.note(req.offset, len as u64);
    match r {
        Ok(()) => {
            ExportStats::add(&ctx.export.stats.bytes_written, len as u64);
            Ok(ok_frame(ctx, req, permit))
        }
        Err(e) => {
            let Fail(errno, msg) = io_fail(&e);
            Ok(error_frame(ctx, req, errno, msg, Some(permit)))
        }
    }
}

/// Admits one change (one write, fallocate or ioctl) under the connection's lease.
/// The guard goes with the change to the I/O backend, which re-checks the epoch
/// right before the kernel sees it and releases the guard when the kernel is done.
pub(super) fn change(ctx: &ConnCtx) -> Result<ChangeGuard, Fail> {
    ctx.export
        .lease
        .begin_change(&ctx.binding)
        .map_err(|_| Fail(EPERM, FENCED_MSG))
}

pub(super) const FENCED_MSG: &str = "write lease fenced";

/// Marks `[offset, offset+len)` in every dirty bitmap of the export, crash-safe
/// before the change is issued (so before it can be acknowledged, or reach the disk
/// at all): the activity log's fdatasync, when one is needed, runs on a blocking
/// thread. Marking a change that then fails only over-reports.
pub(super) async fn mark_dirty(ctx: &ConnCtx, offset: u64, len: u64) -> Result<(), Fail> {
    if len == 0 || ctx.export.bitmaps.mark_fast(offset, len) {
        return Ok(());
    }
    let export = Arc::clone(&ctx.export);
    match tokio::task::spawn_blocking(move || export.bitmaps.mark_durable(offset, len)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::error!(export = %ctx.export.name, error = %e, "dirty bitmap not durable; change refused");
            Err(Fail(EIO, "dirty bitmap could not be made durable"))
        }
        Err(_) => Err(Fail(EIO, "dirty bitmap task failed")),
    }
}

pub(super) async fn write(ctx: &ConnCtx, req: &Request, payload: Option<Buf>) -> Result<(), Fail> {
    write_checks(ctx, req)?;
    let buf = payload.unwrap_or_default();
    let _landing = ctx.export.inflight.begin(req.offset, buf.len() as u64);
    mark_dirty(ctx, req.offset, buf.len() as u64).await?;
    let guard = change(ctx)?;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let n = buf.len() as u64;
    let (buf, r) = ctx
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
    // Mirror jobs: marked, or (write-blocking) written to the target before the reply.
    let change = mirror::Change::Write {
        offset: req.offset,
        data: &buf,
        fua,
    };
    match &r {
        Ok(()) => ctx.export.mirrors.after_change(change, true).await,
        Err(_) => ctx.export.mirrors.note(req.offset, n),
    }
    r.map_err(|e| io_fail(&e))?;
    ExportStats::add(&ctx.export.stats.bytes_written, n);
    Ok(())
}

pub(super) async fn flush(ctx: &ConnCtx, req: &Request) -> Result<(), Fail> {
    check_flags(req, CMD_FLAG_FUA)?;
    ctx.engine
        .sync_data(&ctx.export.file)
        .await
        .map_err(|e| io_fail(&e))
}

pub(super) fn cache(ctx: &ConnCtx, req: &Request) -> Result<(), Fail> {
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

pub(super) async fn trim(ctx: &ConnCtx, req: &Request) -> Result<(), Fail> {
    let _landing = ctx.export.inflight.begin(req.offset, req.length);
    let r = trim_source(ctx, req).await;
    let change = mirror::Change::Trim {
        offset: req.offset,
        len: req.length,
        reads_zero: ctx.export.backing == Backing::File,
    };
    ctx.export.mirrors.after_change(change, r.is_ok()).await;
    r
}

async fn trim_source(ctx: &ConnCtx, req: &Request) -> Result<(), Fail> {
    check_flags(req, CMD_FLAG_FUA)?;
    writable(ctx)?;
    check_range(&ctx.export, req, EINVAL)?;
    if req.length == 0 {
        return Ok(());
    }
    mark_dirty(ctx, req.offset, req.length).await?;
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

pub(super) async fn blk_range_ioctl(
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

pub(super) async fn write_zeroes(ctx: &ConnCtx, req: &Request) -> Result<(), Fail> {
    let _landing = ctx.export.inflight.begin(req.offset, req.length);
    let r = write_zeroes_source(ctx, req).await;
    let change = mirror::Change::Zero {
        offset: req.offset,
        len: req.length,
    };
    ctx.export.mirrors.after_change(change, r.is_ok()).await;
    r
}

async fn write_zeroes_source(ctx: &ConnCtx, req: &Request) -> Result<(), Fail> {
    check_flags(req, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO)?;
    writable(ctx)?;
    check_range(&ctx.export, req, ENOSPC)?;
    if req.length == 0 {
        return Ok(());
    }
    mark_dirty(ctx, req.offset, req.length).await?;
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
pub(super) async fn write_zero_bytes(ctx: &ConnCtx, offset: u64, len: u64) -> Result<(), Fail> {
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
