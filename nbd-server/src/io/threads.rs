//! Fallback backend: a fixed pool of threads doing blocking syscalls.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{Op, OpKind, fenced_error};

/// Enough threads to keep a few operations in flight per core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 4)
        .unwrap_or(8)
        .clamp(4, 64)
}

pub struct Pool {
    tx: Option<mpsc::Sender<Op>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    pub fn new(threads: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Op>();
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            let h = std::thread::Builder::new()
                .name(format!("nbd-io-{i}"))
                .spawn(move || worker(&rx))?;
            workers.push(h);
        }
        Ok(Self {
            tx: Some(tx),
            workers,
        })
    }

    pub(crate) fn submit(&self, op: Op) -> Result<(), Op> {
        match &self.tx {
            Some(tx) => tx.send(op).map_err(|e| e.0),
            None => Err(op),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the channel ends every worker once the queue is drained.
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Op>>) {
    loop {
        let op = {
            let Ok(guard) = rx.lock() else { return };
            match guard.recv() {
                Ok(op) => op,
                Err(_) => return,
            }
        };
        run(op);
    }
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn run(mut op: Op) {
    // The lease re-check sits right before the syscall: a change that waited in the
    // queue while its epoch was fenced never reaches the file.
    if !op.may_issue() {
        op.complete(Err(fenced_error()));
        return;
    }
    let fd = op.file.as_raw_fd();
    let pos = op.pos.min(op.buf.len());
    let res = match op.kind {
        OpKind::Read => {
            let len = op.buf.len() - pos;
            // SAFETY: the pointer and length describe the unused tail of a buffer this
            // thread owns for the duration of the call; `fd` is kept open by `op.file`.
            let r = unsafe {
                libc::pread(
                    fd,
                    op.buf.as_mut_ptr().add(pos).cast(),
                    len,
                    op.offset as i64,
                )
            };
            cvt(r)
        }
        OpKind::Write { dsync } => {
            let iov = libc::iovec {
                // SAFETY: `pos <= len`, so the pointer stays within the owned buffer.
                iov_base: unsafe { op.buf.as_mut_ptr().add(pos) }.cast(),
                iov_len: op.buf.len() - pos,
            };
            let flags = if dsync { libc::RWF_DSYNC } else { 0 };
            // SAFETY: one valid iovec over memory this thread owns; `fd` is open.
            let r = unsafe { libc::pwritev2(fd, &iov, 1, op.offset as i64, flags) };
            cvt(r)
        }
        OpKind::Fsync => {
            // SAFETY: plain syscall on an open descriptor.
            let r = unsafe { libc::fdatasync(fd) };
            cvt(r as isize)
        }
        OpKind::Fallocate { mode, len } => {
            // SAFETY: plain syscall on an open descriptor.
            let r = unsafe { libc::fallocate(fd, mode, op.offset as i64, len as i64) };
            cvt(r as isize)
        }
    };
    op.complete(res);
}
