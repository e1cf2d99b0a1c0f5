//! One incoming migration's session: the memory its streams write (Memory and Sparse
//! frames applied, chunk digests kept up to date) and the control connection's
//! drive from the first pass to the guest running.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::ReceiverState;
use crate::contract::MigrationTarget;
use crate::migration::digest::{ChunkDigests, ChunkHasher};
use crate::migration::protocol::{
    self, Command, Compression, ErrorCode, MemRange, Message, SwitchoverMode, parse_memory,
};
use crate::migration::wire::Conn;

/// One incoming migration, shared by its control and data connections.
pub(super) struct Session {
    pub(super) name: String,
    pub(super) target: Arc<dyn MigrationTarget>,
    pub(super) digests: ChunkDigests,
    pub(super) mem_size: u64,
    /// Set once State arrived (or the session died): data connections stop writing.
    pub(super) closed: AtomicBool,
    /// The initial scan of target memory (see `ChunkDigests::scan_initial`).
    pub(super) scan: Mutex<Option<std::thread::JoinHandle<Result<(), String>>>>,
    /// The session ended: the scan stops early.
    pub(super) ended: AtomicBool,
    /// The session's data connections, shut down when it ends so that they release
    /// the session (and its guest memory) at once.
    pub(super) data_conns: Mutex<Vec<TcpStream>>,
    /// Pages this session wrote (or faulted in for writing): see `prefault`.
    pub(super) written: PageSet,
    /// CPU time of the session's data connection threads that ended, ns (for the log).
    pub(super) data_cpu_ns: std::sync::atomic::AtomicU64,
}

impl Session {
    /// Writes the pages of a Sparse frame, each expanded to a whole page in a small
    /// buffer. A frame that carries every page of a chunk, in order (what the sender
    /// makes of a chunk of counters or flags), is hashed from its own encodings: they
    /// are the canonical encoding `chunk_digest` hashes, and memory now holds exactly
    /// them. Any other chunk it touched is re-hashed from memory after the write.
    pub(super) fn apply_sparse(
        &self,
        h: &protocol::FrameHeader,
        payload: &[u8],
        page_buf: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) -> Result<(), String> {
        let ps = crate::contract::PAGE_SIZE;
        let cs = self.digests.chunk_size();
        let mut touched: Vec<u64> = Vec::new();
        let mut runs: Vec<MemRange> = Vec::new();
        let mut outside = None;
        protocol::parse_sparse(h, payload, |gpa, _| {
            if gpa.checked_add(ps).is_none_or(|e| e > self.mem_size) {
                outside.get_or_insert(gpa);
                return;
            }
            if touched.last() != Some(&(gpa / cs)) {
                touched.push(gpa / cs);
            }
            match runs.last_mut() {
                Some(r) if r.gpa + r.len == gpa => r.len += ps,
                _ => runs.push(MemRange { gpa, len: ps }),
            }
        })
        .map_err(|e| e.to_string())?;
        if let Some(gpa) = outside {
            return Err(format!("page {gpa:#x} is outside guest memory"));
        }
        let whole_chunk = match (touched.as_slice(), runs.as_slice()) {
            ([c], [r]) => (r.gpa, r.len) == self.digests.chunk_range(*c),
            _ => false,
        };
        touched.sort_unstable();
        touched.dedup();
        for c in &touched {
            self.digests.mark_touched(*c);
        }
        self.prefault(&runs);
        let mem = self.target.guest_memory();
        // Kept zero between pages: only the words of each page are set, then cleared.
        page_buf.clear();
        page_buf.resize(ps as usize, 0);
        let mut hasher = whole_chunk.then(ChunkHasher::new);
        let mut failed = None;
        protocol::parse_sparse(h, payload, |gpa, words| {
            for &(i, v) in words {
                let o = usize::from(i) * 8;
                page_buf[o..o + 8].copy_from_slice(&v.to_le_bytes());
            }
            if let Err(e) = mem.write_slice(page_buf, GuestAddress(gpa)) {
                failed.get_or_insert(e.to_string());
            }
            for &(i, _) in words {
                let o = usize::from(i) * 8;
                page_buf[o..o + 8].fill(0);
            }
            if let Some(h) = hasher.as_mut() {
                h.sparse(words);
            }
        })
        .map_err(|e| e.to_string())?;
        if let Some(e) = failed {
            return Err(e);
        }
        if let (Some(h), [c]) = (hasher, touched.as_slice()) {
            self.digests.set(*c, h.finish());
            return Ok(());
        }
        for c in touched {
            self.digests
                .rehash(mem, c, scratch)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Faults in, in one call per run, the pages of `runs` this session has not
    /// written yet (`resident::populate_write`), and marks them written.
    fn prefault(&self, runs: &[MemRange]) {
        let ps = crate::contract::PAGE_SIZE;
        let mem = self.target.guest_memory();
        for r in runs {
            let (first, end) = (r.gpa / ps, (r.gpa + r.len) / ps);
            let mut p = first;
            while p < end {
                if self.written.test_and_set(p) {
                    p += 1;
                    continue;
                }
                let start = p;
                p += 1;
                while p < end && !self.written.test_and_set(p) {
                    p += 1;
                }
                // A single page faults in on its write just as cheaply.
                if p - start > 1 {
                    crate::migration::resident::populate_write(mem, start * ps, (p - start) * ps);
                }
            }
        }
    }

    /// Writes the pages of a Memory frame and re-hashes the chunks they touched.
    pub(super) fn apply(
        &self,
        ranges: &[MemRange],
        data: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<(), String> {
        let mem = self.target.guest_memory();
        let mut touched: Vec<u64> = Vec::new();
        for r in ranges {
            let end = r.gpa.checked_add(r.len).filter(|e| *e <= self.mem_size);
            if end.is_none() {
                return Err(format!(
                    "range {:#x}+{:#x} is outside guest memory",
                    r.gpa, r.len
                ));
            }
            let cs = self.digests.chunk_size();
            for c in r.gpa / cs..=(r.gpa + r.len - 1) / cs {
                if touched.last() != Some(&c) {
                    touched.push(c);
                }
            }
        }
        touched.dedup();
        for c in &touched {
            self.digests.mark_touched(*c);
        }
        self.prefault(ranges);
        let mut off = 0usize;
        for r in ranges {
            let len = r.len as usize;
            mem.write_slice(&data[off..off + len], GuestAddress(r.gpa))
                .map_err(|e| e.to_string())?;
            off += len;
        }
        for c in touched {
            // A frame that carries a whole chunk is hashed from its own bytes; anything
            // else is hashed from memory after the write.
            match ranges {
                [r] if (r.gpa, r.len) == self.digests.chunk_range(c) => {
                    self.digests.record(c, data)
                }
                _ => self
                    .digests
                    .rehash(mem, c, scratch)
                    .map_err(|e| e.to_string())?,
            }
        }
        Ok(())
    }
}

/// A set of page numbers that several connection threads mark at once.
pub(super) struct PageSet(Vec<std::sync::atomic::AtomicU64>);

impl PageSet {
    pub(super) fn new(pages: u64) -> Self {
        PageSet(
            (0..pages.div_ceil(64))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        )
    }

    /// Adds `page`; returns whether it was there already (true beyond the end, so
    /// callers leave such pages alone).
    fn test_and_set(&self, page: u64) -> bool {
        let bit = 1u64 << (page % 64);
        self.0
            .get((page / 64) as usize)
            .is_none_or(|w| w.fetch_or(bit, Ordering::Relaxed) & bit != 0)
    }
}

/// Adds the thread's CPU time since `.0` to `.1` when the data connection ends.
pub(super) struct CpuOnDrop<'a>(
    pub(super) Duration,
    pub(super) &'a std::sync::atomic::AtomicU64,
);

impl Drop for CpuOnDrop<'_> {
    fn drop(&mut self) {
        let used = crate::migration::stats::thread_cpu().saturating_sub(self.0);
        self.1.fetch_add(
            u64::try_from(used.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// The session's switchover mode and how long the source may wait for its go-ahead.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mode {
    pub(super) switchover: SwitchoverMode,
    pub(super) timeout: Duration,
}

/// Runs the control connection from `Memory` to `Running` (or `Closed` on Abandon).
/// Errors carry the code and sentence to send back.
pub(super) fn drive_control(
    conn: &mut Conn,
    s: &Session,
    mode: Mode,
) -> Result<ReceiverState, (ErrorCode, String)> {
    let mut state = ReceiverState::Memory;
    let mut saved: Option<Vec<u8>> = None;
    let (mut scratch, mut payload, mut decompressed) = (Vec::new(), Vec::new(), Vec::new());
    // Exactly one digest per chunk of this guest: the Digests frame's length is known.
    let digests_len = 12 + s.digests.chunks() * 32;
    loop {
        let check = |h: &protocol::FrameHeader| {
            state
                .check_header(h, mode.switchover)
                .map_err(|e| e.to_string())?;
            if h.cmd == Command::Digests && h.length != digests_len {
                return Err(format!(
                    "Digests declares {} payload bytes; this guest's take {digests_len}",
                    h.length
                ));
            }
            Ok(())
        };
        let h = conn
            .recv_frame(&mut payload, check)
            .map_err(|e| (ErrorCode::Protocol, e.to_string()))?;
        state = state
            .next(h.cmd, mode.switchover)
            .map_err(|e| (ErrorCode::Protocol, e.to_string()))?;
        if h.cmd == Command::Sparse {
            s.apply_sparse(&h, &payload, &mut decompressed, &mut scratch)
                .map_err(|e| (ErrorCode::Protocol, e))?;
            continue;
        }
        if h.cmd == Command::Memory {
            let (ranges, data) = parse_memory(&h, &payload, &mut decompressed)
                .map_err(|e| (ErrorCode::Protocol, e.to_string()))?;
            s.apply(&ranges, data, &mut scratch)
                .map_err(|e| (ErrorCode::Protocol, e))?;
            continue;
        }
        let msg =
            Message::decode(&h, &payload).map_err(|e| (ErrorCode::Protocol, e.to_string()))?;
        let ok = |conn: &mut Conn| {
            conn.send(&Message::Ok { payload: vec![] }, Compression::None)
                .map(|_| ())
                .map_err(|e| (ErrorCode::Internal, e.to_string()))
        };
        match msg {
            Message::Sync { .. } => ok(conn)?,
            Message::State { state: st } => {
                // Data connections were synced before State; no more memory may land.
                s.closed.store(true, Ordering::SeqCst);
                saved = Some(st);
                ok(conn)?;
            }
            Message::Digests {
                chunk_size,
                digests,
            } => {
                if chunk_size != s.digests.chunk_size() {
                    return Err((
                        ErrorCode::Protocol,
                        format!("digest chunk size {chunk_size} differs from the session's"),
                    ));
                }
                // The initial scan must be done before its digests mean anything.
                let scan = s.scan.lock().expect("scan lock is never poisoned").take();
                match scan.map(|h| h.join()) {
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => {
                        return Err((
                            ErrorCode::Internal,
                            format!("scanning target memory failed: {e}"),
                        ));
                    }
                    Some(Err(_)) => {
                        return Err((
                            ErrorCode::Internal,
                            "the memory scan thread panicked".into(),
                        ));
                    }
                    None => {
                        return Err((ErrorCode::Internal, "the memory scan did not run".into()));
                    }
                }
                let bad = s.digests.mismatches(&digests);
                if !bad.is_empty() {
                    return Err((
                        ErrorCode::DigestMismatch,
                        format!(
                            "target memory differs from the source image in {} of {} chunks (first: chunk {})",
                            bad.len(),
                            s.digests.chunks(),
                            bad[0]
                        ),
                    ));
                }
                if mode.switchover == SwitchoverMode::Coordinated {
                    // The source now waits for the coordinator's go-ahead: silence on
                    // this connection is expected for up to its switchover timeout.
                    conn.set_read_timeout(
                        mode.timeout
                            .saturating_add(crate::migration::wire::IO_TIMEOUT),
                    )
                    .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
                }
                ok(conn)?;
            }
            Message::Switchover { disks } => {
                conn.set_read_timeout(crate::migration::wire::IO_TIMEOUT)
                    .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
                // The go-ahead's URIs (never the source's tokens) before anything runs.
                s.target
                    .set_disks(&disks)
                    .map_err(|e| (ErrorCode::RestoreFailed, e.to_string()))?;
                tracing::info!(vm = %s.name, disks = disks.len(), "switchover go-ahead received");
                ok(conn)?;
            }
            Message::Complete => {
                let st = saved
                    .take()
                    .ok_or((ErrorCode::Protocol, "Complete without State".to_string()))?;
                s.target
                    .restore_state(&st)
                    .map_err(|e| (ErrorCode::RestoreFailed, e.to_string()))?;
                s.target
                    .resume()
                    .map_err(|e| (ErrorCode::RestoreFailed, e.to_string()))?;
                // The Ok is sent by the caller once the manager marked the VM running.
                return Ok(ReceiverState::Running);
            }
            Message::Abandon { reason } => {
                tracing::info!(vm = %s.name, %reason, "source abandoned the migration");
                return Ok(ReceiverState::Closed);
            }
            _ => return Err((ErrorCode::Protocol, "unexpected message".into())),
        }
    }
}
