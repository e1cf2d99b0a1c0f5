//! A minimal paravirtual block device over NBD: one 32-byte port-I/O register block
//! per disk (disk `i` at [`BLK_PORT_BASE`]` + i * `[`BLK_PORT_STRIDE`]), polled by the
//! guest. Registers (32 bits each, little endian; byte and word accesses reach the
//! corresponding bytes):
//!
//! | offset | name        | access | meaning |
//! |--------|-------------|--------|---------|
//! | 0x00   | CAPACITY_LO | R      | disk size in 512-byte sectors, low half (valid after IDENTIFY) |
//! | 0x04   | CAPACITY_HI | R      | high half |
//! | 0x08   | SECTOR_LO   | R/W    | first sector of the request |
//! | 0x0c   | SECTOR_HI   | R/W    | |
//! | 0x10   | ADDR_LO     | R/W    | guest-physical buffer address |
//! | 0x14   | ADDR_HI     | R/W    | |
//! | 0x18   | LENGTH      | R/W    | bytes, a multiple of 512, 512..=1 MiB |
//! | 0x1c   | COMMAND (W) / STATUS (R) | | write 1 READ, 2 WRITE, 3 FLUSH, 4 IDENTIFY; read 0 idle, 1 busy, 2 ok, 3 error |
//!
//! Writing COMMAND starts the request and returns to the guest at once with STATUS
//! busy; the request runs on the agent's tokio runtime through `nbd_client`,
//! and STATUS becomes ok or error. A command written while busy is ignored. WRITE
//! copies the guest buffer when the command is written; READ stores into guest RAM
//! through vm-memory (so the dirty bitmap sees it) before STATUS says ok. Every request
//! is checked (guest RAM range, sector range, length): a bad one ends in error, never
//! in a crash. NBD failures (a fenced lease, a cut connection) are errors for the
//! guest and a warning in the log; a cut connection is re-opened by the next request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use nbd_client::{Client, ClientError};

use tokio::runtime::Handle;
use vm_memory::{Bytes, GuestAddress};

use super::disk_uri::DiskUri;
use crate::contract::DiskSpec;
use crate::vstate::memory::{GuestMemoryAtomic, ram_size};

mod regs;

pub use regs::*;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a single NBD request may take before the guest sees an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Requests in flight over all disks of a VM, for draining at pause.
#[derive(Default)]
struct InFlight {
    count: Mutex<u64>,
    idle: Condvar,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(&self) {
        *self.lock() += 1;
    }

    fn end(&self) {
        let mut n = self.lock();
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    /// Waits until nothing is in flight; false on timeout.
    fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut n = self.lock();
        while *n > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            n = match self.idle.wait_timeout(n, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
}

/// The URI a disk uses now; `generation` changes with every replacement so an open
/// connection to the old URI is not reused.
struct Location {
    generation: u64,
    uri: DiskUri,
}

struct Disk {
    index: usize,
    vm: String,
    location: Mutex<Location>,
    regs: Mutex<BlockRegs>,
    conn: tokio::sync::Mutex<Option<(u64, Arc<Client>)>>,
    /// Writes were acknowledged since the last flush.
    unflushed: AtomicBool,
    /// Requests failed in a row (a fenced guest retries forever: the log says so
    /// for the first few and then every thousandth).
    failures: AtomicU64,
}

impl Disk {
    fn regs(&self) -> std::sync::MutexGuard<'_, BlockRegs> {
        self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn location(&self) -> std::sync::MutexGuard<'_, Location> {
        self.location.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open connection to the current URI, opening it if needed. Errors carry
    /// the redacted URI and never the token.
    async fn client(&self) -> Result<Arc<Client>, String> {
        let (generation, uri) = {
            let l = self.location();
            (l.generation, l.uri.clone())
        };
        let mut slot = self.conn.lock().await;
        if let Some((g, c)) = slot.as_ref()
            && *g == generation
        {
            return Ok(c.clone());
        }
        *slot = None;
        let client = match tokio::time::timeout(CONNECT_TIMEOUT, uri.connect()).await {
            Ok(Ok(c)) => Arc::new(c),
            Ok(Err(e)) => {
                return Err(uri.scrub(&format!("cannot open {}: {e}", uri.redacted())));
            }
            Err(_) => {
                return Err(format!(
                    "cannot open {}: no answer within {CONNECT_TIMEOUT:?}",
                    uri.redacted()
                ));
            }
        };
        if client.info().read_only() {
            tracing::warn!(vm = %self.vm, disk = self.index, uri = %uri.redacted(), "disk opened read-only: writes will fail");
        }
        self.regs().capacity = client.size() / SECTOR_SIZE;
        tracing::info!(vm = %self.vm, disk = self.index, uri = %uri.redacted(), sectors = client.size() / SECTOR_SIZE, "disk connected");
        *slot = Some((generation, client.clone()));
        Ok(client)
    }

    /// Logs a failed request: the first ten in a row, then every thousandth (a
    /// fenced guest retries forever, a broken one may loop on bad requests).
    fn note_failure(&self, error: &str) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 10 || n.is_multiple_of(1000) {
            tracing::warn!(vm = %self.vm, disk = self.index, failures_in_a_row = n, %error, "disk request failed; the guest sees an error");
        }
    }

    /// Forgets a connection that failed underneath (the next request re-opens it).
    async fn drop_client(&self, failed: &Arc<Client>) {
        let mut slot = self.conn.lock().await;
        if slot.as_ref().is_some_and(|(_, c)| Arc::ptr_eq(c, failed)) {
            *slot = None;
        }
    }

    async fn execute(
        &self,
        req: Request,
        data: Option<Vec<u8>>,
        mem: &GuestMemoryAtomic,
    ) -> Result<(), String> {
        let client = self.client().await?;
        let redact = |e: ClientError| {
            let l = self.location();
            l.uri.scrub(&format!("{} on {}", e, l.uri.redacted()))
        };
        let io = async {
            match req {
                Request::Identify => Ok(()),
                Request::Flush => {
                    client.flush().await?;
                    self.unflushed.store(false, Ordering::Relaxed);
                    Ok(())
                }
                Request::Read { offset, addr, len } => {
                    check_disk_range(offset, len, client.size()).map_err(ClientError::Protocol)?;
                    let buf = client.read(offset, len).await?;
                    // Through vm-memory: the AtomicBitmap marks the pages dirty.
                    mem.write_slice(&buf, GuestAddress(addr)).map_err(|e| {
                        ClientError::Protocol(format!("cannot store into guest RAM: {e}"))
                    })
                }
                Request::Write { offset, len } => {
                    check_disk_range(offset, len, client.size()).map_err(ClientError::Protocol)?;
                    let data = data.unwrap_or_default();
                    client.write(offset, &data, false).await?;
                    self.unflushed.store(true, Ordering::Relaxed);
                    Ok(())
                }
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, io).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                let transport = matches!(
                    e,
                    ClientError::Io(_) | ClientError::Closed | ClientError::Codec(_)
                );
                let msg = redact(e);
                if transport {
                    self.drop_client(&client).await;
                }
                Err(msg)
            }
            Err(_) => {
                self.drop_client(&client).await;
                Err(format!("no answer within {REQUEST_TIMEOUT:?}"))
            }
        }
    }

    async fn flush_if_needed(&self) -> Result<(), String> {
        if !self.unflushed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let client = {
            let slot = self.conn.lock().await;
            match slot.as_ref() {
                Some((_, c)) => c.clone(),
                None => return Ok(()),
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, client.flush()).await {
            Ok(Ok(())) => {
                self.unflushed.store(false, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(e)) => {
                let l = self.location();
                Err(l.uri.scrub(&format!("flush on {}: {e}", l.uri.redacted())))
            }
            Err(_) => Err(format!("flush: no answer within {REQUEST_TIMEOUT:?}")),
        }
    }
}

/// The block devices of one VM.
pub struct BlockDevices {
    disks: Vec<Arc<Disk>>,
    mem: GuestMemoryAtomic,
    runtime: Handle,
    in_flight: Arc<InFlight>,
}

impl std::fmt::Debug for BlockDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevices")
            .field("disks", &self.disks.len())
            .finish()
    }
}

/// Runs `fut` on `rt` and waits for it from this (non-async) thread.
fn run_blocking<T: Send + 'static>(
    rt: &Handle,
    timeout: Duration,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv_timeout(timeout).ok()
}

impl BlockDevices {
    /// Disks for `uris` (not connected yet). `mem` is the VM's RAM.
    pub fn new(
        vm: &str,
        uris: &[DiskSpec],
        mem: GuestMemoryAtomic,
        runtime: Handle,
    ) -> Result<Self, String> {
        if uris.len() > MAX_DISKS {
            return Err(format!(
                "{} disks given; at most {MAX_DISKS} are supported",
                uris.len()
            ));
        }
        let disks = uris
            .iter()
            .enumerate()
            .map(|(index, u)| {
                Ok(Arc::new(Disk {
                    index,
                    vm: vm.to_string(),
                    location: Mutex::new(Location {
                        generation: 0,
                        uri: DiskUri::new(u)?,
                    }),
                    regs: Mutex::new(BlockRegs::default()),
                    conn: tokio::sync::Mutex::new(None),
                    unflushed: AtomicBool::new(false),
                    failures: AtomicU64::new(0),
                }))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(BlockDevices {
            disks,
            mem,
            runtime,
            in_flight: Arc::default(),
        })
    }

    /// Which disk and register offset `port` falls on.
    fn locate(&self, port: u16) -> Option<(&Arc<Disk>, u16)> {
        let rel = port.checked_sub(BLK_PORT_BASE)?;
        let disk = self.disks.get(usize::from(rel / BLK_PORT_STRIDE))?;
        Some((disk, rel % BLK_PORT_STRIDE))
    }

    /// Whether `port` belongs to one of these disks.
    pub fn claims(&self, port: u16) -> bool {
        self.locate(port).is_some()
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            let p = port.wrapping_add(i as u16);
            *out = match self.locate(p) {
                Some((disk, off)) => {
                    let reg = off & !3;
                    (disk.regs().read_reg(reg) >> (u32::from(off & 3) * 8)) as u8
                }
                None => 0xff,
            };
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let mut command: Option<&Arc<Disk>> = None;
        for (i, &b) in data.iter().enumerate() {
            let p = port.wrapping_add(i as u16);
            if let Some((disk, off)) = self.locate(p) {
                let reg = off & !3;
                disk.regs().write_byte(reg, off & 3, b);
                if reg == REG_COMMAND {
                    command = Some(disk);
                }
            }
        }
        if let Some(disk) = command {
            self.start(disk);
        }
    }

    /// Starts the request the disk's registers describe.
    fn start(&self, disk: &Arc<Disk>) {
        let mut regs = disk.regs();
        if regs.status == STATUS_BUSY {
            return; // one request at a time; the guest polls STATUS first
        }
        let req = match regs.request(ram_size(&self.mem)) {
            Ok(r) => r,
            Err(why) => {
                regs.status = STATUS_ERROR;
                drop(regs);
                disk.note_failure(&format!("bad request from the guest: {why}"));
                return;
            }
        };
        // WRITE takes the guest's buffer now, as a DMA engine would at submission.
        let data = match req {
            Request::Write { len, .. } => {
                let mut buf = vec![0u8; len as usize];
                if let Err(e) = self.mem.read_slice(&mut buf, GuestAddress(regs.addr)) {
                    regs.status = STATUS_ERROR;
                    drop(regs);
                    disk.note_failure(&format!("bad request from the guest: {e}"));
                    return;
                }
                Some(buf)
            }
            _ => None,
        };
        regs.status = STATUS_BUSY;
        drop(regs);
        self.in_flight.begin();
        let (disk, mem, in_flight) = (disk.clone(), self.mem.clone(), self.in_flight.clone());
        self.runtime.spawn(async move {
            let result = disk.execute(req, data, &mem).await;
            disk.regs().status = match &result {
                Ok(()) => STATUS_OK,
                Err(_) => STATUS_ERROR,
            };
            match result {
                Ok(()) => {
                    let failed = disk.failures.swap(0, Ordering::Relaxed);
                    if failed > 0 {
                        tracing::info!(vm = %disk.vm, disk = disk.index, failed, "disk requests succeed again");
                    }
                }
                Err(error) => disk.note_failure(&error),
            }
            in_flight.end();
        });
    }

    /// Opens every disk's connection in the background (failures are logged; the
    /// guest's next request tries again).
    pub fn connect_in_background(&self) {
        for disk in &self.disks {
            let disk = disk.clone();
            self.runtime.spawn(async move {
                if let Err(error) = disk.client().await {
                    tracing::warn!(vm = %disk.vm, disk = disk.index, %error, "cannot open the disk yet");
                }
            });
        }
    }

    /// Waits for every request in flight, then flushes disks written since their
    /// last flush. A flush that fails (a fenced lease) is logged, not fatal: pausing
    /// must still work so the VM can be given new disks.
    pub fn quiesce(&self, timeout: Duration) -> Result<(), String> {
        if !self.in_flight.wait_idle(timeout) {
            return Err(format!("disk requests still in flight after {timeout:?}"));
        }
        for disk in &self.disks {
            let d = disk.clone();
            match run_blocking(
                &self.runtime,
                timeout,
                async move { d.flush_if_needed().await },
            ) {
                Some(Ok(())) => {}
                Some(Err(error)) => {
                    tracing::warn!(vm = %disk.vm, disk = disk.index, %error, "flush at pause failed");
                }
                None => {
                    tracing::warn!(vm = %disk.vm, disk = disk.index, "flush at pause timed out");
                }
            }
        }
        Ok(())
    }

    /// The URIs in use, in disk order.
    pub fn uris(&self) -> Vec<DiskSpec> {
        self.disks.iter().map(|d| d.location().uri.spec()).collect()
    }

    /// Replaces the URIs (one per disk, same order) and opens them, waiting for the
    /// connections. Call only with no request in flight (paused and quiesced).
    pub fn set_uris(&self, uris: &[DiskSpec]) -> Result<(), String> {
        if uris.len() != self.disks.len() {
            return Err(format!(
                "{} disk URIs given; this VM has {} disks",
                uris.len(),
                self.disks.len()
            ));
        }
        let parsed = uris
            .iter()
            .map(DiskUri::new)
            .collect::<Result<Vec<_>, _>>()?;
        for (disk, uri) in self.disks.iter().zip(parsed) {
            let mut l = disk.location();
            l.generation += 1;
            l.uri = uri;
        }
        let mut errors = Vec::new();
        for disk in &self.disks {
            let d = disk.clone();
            match run_blocking(&self.runtime, CONNECT_TIMEOUT * 2, async move {
                d.client().await.map(|_| ())
            }) {
                Some(Ok(())) => {}
                Some(Err(e)) => errors.push(format!("disk {}: {e}", disk.index)),
                None => errors.push(format!("disk {}: connecting timed out", disk.index)),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    pub fn save_state(&self) -> Vec<BlockRegs> {
        self.disks.iter().map(|d| d.regs().clone()).collect()
    }

    /// Loads saved registers. A request cannot be in flight in a saved state (pause
    /// drains); should one say busy anyway, the guest sees an error and retries.
    pub fn restore_state(&self, state: &[BlockRegs]) -> Result<(), String> {
        if state.len() != self.disks.len() {
            return Err(format!(
                "device state has {} disks, this VM {}",
                state.len(),
                self.disks.len()
            ));
        }
        for (disk, s) in self.disks.iter().zip(state) {
            let mut r = s.clone();
            if r.status == STATUS_BUSY {
                r.status = STATUS_ERROR;
            }
            *disk.regs() = r;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
