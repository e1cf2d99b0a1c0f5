//! The reply writer: one task per connection owns the write half and batches
//! replies; large read payloads go out without a copy (sendfile on plain sockets).

use super::*;

/// One reply, written by the writer task; its permit is released once written.
pub(super) struct Frame {
    pub(super) head: Vec<u8>,
    pub(super) data: Option<Buf>,
    /// Data sent straight from the file by the writer (zero copy), after `head`.
    pub(super) file: Option<FileRange>,
    pub(super) _permit: Option<OwnedSemaphorePermit>,
}

pub(super) struct FileRange {
    pub(super) file: Arc<File>,
    pub(super) offset: u64,
    pub(super) len: usize,
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

pub(super) async fn write_loop<W: ReplySink>(
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
pub(super) async fn put_frame<W: ReplySink>(
    w: &mut W,
    stage: &mut Vec<u8>,
    f: Frame,
) -> io::Result<()> {
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

pub(super) async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    parts: [&[u8]; 3],
) -> io::Result<()> {
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
