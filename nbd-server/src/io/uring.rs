//! io_uring backend: one ring owned by one thread.
//!
//! Connections send `Op`s through a channel. The ring thread keeps a read armed
//! on an eventfd, so a single `submit_and_wait` sleeps on both new work and I/O
//! completions. Submitters only write the eventfd when the ring thread may be
//! asleep (`notified` flag), so a burst of requests costs one wake-up.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use io_uring::{IoUring, Probe, opcode, types};
use slab::Slab;

use super::{Op, OpKind, fenced_error};

const RING_ENTRIES: u32 = 256;
/// Operations in the kernel at once; the completion queue (2x entries) never overflows.
const MAX_IN_FLIGHT: usize = 256;
const EVENTFD_TOKEN: u64 = u64::MAX;
/// The fence tick: armed while changes of leased exports are in the kernel.
const TICK_TOKEN: u64 = u64::MAX - 1;
/// Completions of our own cancel requests (their outcome shows on the target).
const CANCEL_TOKEN: u64 = u64::MAX - 2;
/// How often the ring thread looks for fenced changes still queued in the kernel
/// (a fence also wakes it at once, through [`crate::lease::FenceListener`]; the tick
/// catches changes that were on their way into the ring at that instant).
///
/// A buffered write the file system cannot do without blocking (ext4 here) waits in
/// the kernel's io-wq, which runs the writes to one file one at a time, so a fence
/// could otherwise wait for a long queue of older-epoch writes (8 connections at
/// queue depth 16: up to 128). Every tick the ring thread asks the kernel to cancel
/// the fenced ones; a write not yet started is dropped (ECANCELED, answered
/// NBD_EPERM) and never touches the file. Capping the changes in the kernel instead
/// cost throughput on a busy machine: io-wq idled whenever the ring thread was
/// slow to refill it.
const FENCE_TICK: Duration = Duration::from_millis(1);
/// Largest single read/write submitted (io_uring lengths are 32-bit).
const MAX_OP_LEN: usize = 1 << 30;

struct Shared {
    notified: AtomicBool,
    /// A fence happened since the ring thread last looked: cancel fenced changes now.
    fence_pending: AtomicBool,
    eventfd: OwnedFd,
}

impl crate::lease::FenceListener for Shared {
    fn fenced(&self) {
        self.fence_pending.store(true, Ordering::SeqCst);
        self.wake();
    }
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let _ = unsafe { libc::write(self.eventfd.as_raw_fd(), (&raw const one).cast(), 8) };
    }
}

pub struct Uring {
    tx: Option<mpsc::Sender<Op>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Uring {
    /// Creates the ring and checks that the kernel supports every opcode we use.
    pub fn new() -> io::Result<Self> {
        // Room for a completion per operation, per cancel request and the rest.
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 4)
            .build(RING_ENTRIES)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [
            opcode::Read::CODE,
            opcode::Write::CODE,
            opcode::Fsync::CODE,
            opcode::Fallocate::CODE,
            opcode::Timeout::CODE,
            opcode::AsyncCancel::CODE,
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring opcode {code} missing"),
                ));
            }
        }
        // SAFETY: plain syscall; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(Shared {
            notified: AtomicBool::new(false),
            fence_pending: AtomicBool::new(false),
            eventfd,
        });
        let listener: Arc<dyn crate::lease::FenceListener> = shared.clone();
        crate::lease::add_fence_listener(Arc::downgrade(&listener));
        let (tx, rx) = mpsc::channel();
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("nbd-uring".into())
            .spawn(move || {
                if let Err(e) = ring_loop(ring, &sh, &rx) {
                    tracing::error!(error = %e, "io_uring thread failed");
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            shared,
            thread: Some(thread),
        })
    }

    pub(crate) fn submit(&self, op: Op) -> Result<(), Op> {
        let Some(tx) = &self.tx else { return Err(op) };
        tx.send(op).map_err(|e| e.0)?;
        // Only the first submitter after the ring thread drained the channel pays
        // for a wake-up (see `ring_loop`, which clears the flag before draining).
        if !self.shared.notified.swap(true, Ordering::SeqCst) {
            self.shared.wake();
        }
        Ok(())
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.tx.take();
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct InFlight {
    op: Op,
    /// Slab key in the low 32 bits, a generation above: a late cancel request can
    /// never hit a newer operation that reuses the slot.
    user_data: u64,
    /// A cancel request for it went to the kernel (sent once).
    cancel_sent: bool,
}

fn sqe_for(op: &mut Op, token: u64) -> io_uring::squeue::Entry {
    let fd = types::Fd(op.file.as_raw_fd());
    let pos = op.pos.min(op.buf.len());
    let len = (op.buf.len() - pos).min(MAX_OP_LEN) as u32;
    match op.kind {
        OpKind::Read => {
            // SAFETY: `pos <= buf.len()`, so the pointer stays within the buffer.
            let ptr = unsafe { op.buf.as_mut_ptr().add(pos) };
            opcode::Read::new(fd, ptr, len).offset(op.offset).build()
        }
        OpKind::Write { dsync } => {
            // SAFETY: as above.
            let ptr = unsafe { op.buf.as_ptr().add(pos) };
            let flags = if dsync { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(fd, ptr, len)
                .offset(op.offset)
                .rw_flags(flags)
                .build()
        }
        OpKind::Fsync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        OpKind::Fallocate { mode, len } => opcode::Fallocate::new(fd, len)
            .offset(op.offset)
            .mode(mode)
            .build(),
    }
    .user_data(token)
}

fn ring_loop(ring: IoUring, shared: &Shared, rx: &mpsc::Receiver<Op>) -> io::Result<()> {
    // Declared before the ring so that they are dropped after it: closing the ring
    // cancels whatever still points into them.
    let mut efd_buf = Box::new([0u8; 8]);
    let tick = Box::new(
        types::Timespec::new()
            .sec(FENCE_TICK.as_secs())
            .nsec(FENCE_TICK.subsec_nanos()),
    );
    let mut slab: Slab<InFlight> = Slab::with_capacity(MAX_IN_FLIGHT);
    let mut backlog: VecDeque<Op> = VecDeque::new();
    // Changes of leased exports in the kernel: while there are any, the tick is armed.
    let mut leased_in_flight = 0usize;
    let mut ring = ring;
    let mut efd_armed = false;
    let mut tick_armed = false;
    let mut closed = false;
    // Kept below 2^31 so that no user_data reaches the reserved tokens at the top.
    let mut generation: u32 = 0;

    loop {
        if !efd_armed && !closed {
            let e = opcode::Read::new(
                types::Fd(shared.eventfd.as_raw_fd()),
                efd_buf.as_mut_ptr(),
                8,
            )
            .build()
            .user_data(EVENTFD_TOKEN);
            // SAFETY: `efd_buf` is boxed and lives until this function returns, after
            // the ring (and so any read into it) is gone; the ring is never full
            // here because we submit before pushing more (see below).
            unsafe { push(&mut ring, &e)? };
            efd_armed = true;
        }
        // Move queued operations into the ring, within the in-flight cap.
        while slab.len() < MAX_IN_FLIGHT {
            let Some(mut op) = backlog.pop_front() else {
                break;
            };
            // The lease re-check, right before the SQE: a change whose epoch was
            // fenced while it waited never reaches the kernel.
            if !op.may_issue() {
                op.complete(Err(fenced_error()));
                continue;
            }
            if op.is_leased_change() {
                leased_in_flight += 1;
            }
            let entry = slab.vacant_entry();
            generation = generation.wrapping_add(1) & 0x7fff_ffff;
            let token = entry.key() as u64 | (u64::from(generation) << 32);
            let sqe = sqe_for(&mut op, token);
            // The buffer and file now belong to the slab until the completion arrives.
            entry.insert(InFlight {
                op,
                user_data: token,
                cancel_sent: false,
            });
            // SAFETY: the SQE points into the buffer and file held by the slab entry,
            // which stays put until its completion is reaped below.
            unsafe { push(&mut ring, &sqe)? };
        }
        if leased_in_flight > 0 && !tick_armed {
            let e = opcode::Timeout::new(&raw const *tick)
                .build()
                .user_data(TICK_TOKEN);
            // SAFETY: the kernel copies the timespec when it takes the SQE; `tick` is
            // boxed and outlives the ring anyway.
            unsafe { push(&mut ring, &e)? };
            tick_armed = true;
        }
        if closed && slab.is_empty() && backlog.is_empty() {
            return Ok(());
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::EINTR)
                    || e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        let mut woke = false;
        let mut ticked = false;
        for cqe in ring.completion() {
            let token = cqe.user_data();
            match token {
                EVENTFD_TOKEN => {
                    efd_armed = false;
                    woke = true;
                    continue;
                }
                TICK_TOKEN => {
                    tick_armed = false;
                    ticked = true;
                    continue;
                }
                CANCEL_TOKEN => continue,
                _ => {}
            }
            let key = (token & 0xffff_ffff) as usize;
            if slab.get(key).is_none_or(|f| f.user_data != token) {
                continue;
            }
            let Some(done) = slab.try_remove(key) else {
                continue;
            };
            let res = cqe.result();
            let r = if res == -libc::ECANCELED && !done.op.may_issue() {
                // Cancelled below before it started: no byte of it landed.
                Err(fenced_error())
            } else if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as usize)
            };
            if done.op.is_leased_change() {
                leased_in_flight -= 1;
            }
            done.op.complete(r);
        }
        if woke && shared.fence_pending.swap(false, Ordering::SeqCst) {
            ticked = true;
        }
        if ticked {
            // Ask the kernel to drop every fenced change it has not started. One that
            // is already running completes normally; the fence waits for it.
            for (_, f) in slab.iter_mut() {
                if !f.cancel_sent && f.op.is_leased_change() && !f.op.may_issue() {
                    f.cancel_sent = true;
                    let e = opcode::AsyncCancel::new(f.user_data)
                        .build()
                        .user_data(CANCEL_TOKEN);
                    // SAFETY: a cancel request points at no memory of ours.
                    unsafe { push(&mut ring, &e)? };
                }
            }
        }
        if woke || !backlog.is_empty() || slab.len() < MAX_IN_FLIGHT {
            // Clear before draining: a submitter that queues after the drain sees
            // `false` and writes the eventfd, so no operation is left behind.
            shared.notified.store(false, Ordering::SeqCst);
            loop {
                match rx.try_recv() {
                    Ok(op) => backlog.push_back(op),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
        }
    }
}

/// Pushes one SQE, submitting first when the submission queue is full.
///
/// # Safety
/// The entry's buffers must stay valid until its completion is reaped.
unsafe fn push(ring: &mut IoUring, e: &io_uring::squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: forwarded from the caller's contract.
        if unsafe { ring.submission().push(e) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}
