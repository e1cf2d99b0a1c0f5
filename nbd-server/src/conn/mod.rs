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

mod extents;
mod ops;
mod splice;
mod writer;

use extents::*;
pub(crate) use extents::{extents_without_lseek, seek_extents};
use ops::*;
pub(crate) use splice::{PayloadSource, SpliceSocket};
use splice::{Pipe, Received, SPLICE_WRITE_MIN};
pub(crate) use writer::ReplySink;
use writer::*;

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
    /// Selected `qemu:dirty-bitmap:NAME` contexts: (context id, bitmap).
    pub bitmaps: Vec<(u32, Arc<crate::bitmap::DirtyBitmap>)>,
    pub engine: Arc<IoEngine>,
    pub pool: Arc<BufPool>,
    /// Large reads are sent straight from the file (see [`SENDFILE_MIN`]); set for
    /// files on memory filesystems, where sendfile never waits for a device.
    pub zero_copy: bool,
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
    R: PayloadSource,
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
        bitmaps: neg.bitmaps,
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
/// (copy) to 4500-6700 MiB/s. For 256 KiB reads (nbdcopy's size) a quiet run once
/// found the copy a little faster, as a loopback reader then pays for receiving page
/// fragments (a reader behind a NIC does anyway); what sendfile saves is the
/// server's CPU: perf put the two copies (file to buffer, buffer to socket) at 47 %
/// of its time under nbdcopy, and with sendfile from 256 KiB its CPU per MiB went
/// from a median of 695 to 443 us (nbdkit: 652), at 555-739 -> 712-1028 MiB/s
/// (four interleaved rounds of three copies each, on the loaded 2-core machine).
const SENDFILE_MIN: u64 = 256 << 10;

/// Most replies gathered before the reader hands them over anyway.
const MAX_BATCH: usize = 64;

async fn read_loop<R: PayloadSource>(
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
    // Made on the first large write; None for good when the kernel refuses one.
    let mut pipe: Option<Pipe> = None;
    let mut pipe_refused = !(R::SPLICE && ctx.zero_copy);
    let mut spliced = splice::Counts::default();
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
            let splice = !pipe_refused
                && req.command == CMD_WRITE
                && req.flags & CMD_FLAG_FUA == 0
                // A write-blocking mirror job forwards the bytes: they must be here.
                && !ctx.export.mirrors.blocks_writes()
                && (SPLICE_WRITE_MIN..=WRITE_INLINE_MAX).contains(&payload_len);
            if splice && pipe.is_none() {
                pipe = Pipe::new();
                pipe_refused = pipe.is_none();
                if pipe_refused {
                    tracing::debug!("no pipe large enough for spliced writes; copying");
                }
            }
            match pipe.as_ref() {
                Some(p) if splice && payload_len <= p.max_payload() => {
                    match splice::receive(rd, p, payload_len as usize, &ctx.pool).await? {
                        Received::InPipe => {
                            spliced.writes += 1;
                            batch.frames.push(write_piped(ctx, &req, p, permit).await?);
                            if batch.frames.len() >= MAX_BATCH {
                                batch.flush();
                            }
                            continue;
                        }
                        Received::Copied(buf) => {
                            spliced.fallbacks += 1;
                            Some(buf)
                        }
                    }
                }
                _ => {
                    let mut buf = ctx.pool.get(payload_len as usize);
                    // A client that vanishes mid-payload leaves nothing behind: the
                    // write is only submitted once the whole payload is here.
                    rd.read_exact(&mut buf).await?;
                    Some(buf)
                }
            }
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
