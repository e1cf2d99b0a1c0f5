//! The pre-copy sender: runs on its own thread, one scoped thread per stream per pass.
//!
//! Sequence (see `protocol` for the wire side): connect and authenticate every stream,
//! Config (the target creates the VM), start dirty logging, pass 0 over all non-zero
//! pages, then passes over the dirty pages until `policy::Precopy` says the rest fits
//! the downtime limit; then pause, last dirty pages, State, Digests, Complete.
//!
//! Rollback rule: until the target has acknowledged `Complete` the guest's only running
//! copy is the source's; any error before `Complete` was sent resumes the source. If
//! the connection breaks after `Complete` was sent and before its answer, the outcome
//! is unknown (the target may be running), so the source stays paused and the
//! migration fails with `outcome_unknown` for an operator or the coordinator to settle.
//!
//! Coordinated switchover: at the switch the source pauses (which drains and flushes
//! its disks), opens the go-ahead window and reports `quiesced`; it sends the last
//! pages, State and Digests meanwhile, then waits for the go-ahead (or a cancel, the
//! timeout, or the target vanishing). From `quiesced` on the source never resumes on
//! its own: the coordinator may have fenced its disks away. Only a cancel before the
//! go-ahead resumes it; every failure leaves it paused (`VmHost::end_outgoing_paused`).

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, bitmap::AtomicBitmap};

use super::VmHost;
use super::bitmap;
use super::digest::{CHUNK_SIZE, ChunkDigests, PageScan, scan_chunk};
use super::policy::{Decision, PassReport, Precopy, RateLimiter};
use super::protocol::{
    self, AuthKind, Compression, ErrorCode, ID_LEN, MemRange, Message, NONCE_LEN, SparseFrame,
    SwitchoverMode, auth,
};
use super::stats::{
    Downtime, ErrorInfo, MigrationState, Outgoing, PassInfo, Window, ms, raise_thread_priority,
    thread_cpu,
};

/// Shortest interval between two passes while the switchover is held.
const HELD_PASS_INTERVAL: Duration = Duration::from_millis(50);
use super::wire::{Conn, Stream, WireError};
use crate::contract::{MigrationSource, PAGE_SIZE, VmError};

/// How the sender reaches and proves itself to the target.
#[derive(Clone)]
pub struct SendParams {
    pub target: String,
    pub streams: u16,
    pub compression: Compression,
    /// Token or ticket secret the proofs are made with.
    pub secret: Vec<u8>,
    pub auth: AuthKind,
    pub switchover: SwitchoverMode,
    /// Coordinated mode: how long the quiesced source waits for the go-ahead.
    pub switchover_timeout: Duration,
    /// `--tls-*`: every stream is TLS, the target checked against the CA under the
    /// host part of `target` as its name, our certificate presented.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("the VM failed: {0}")]
    Vm(#[from] VmError),
    #[error("the target did not prove it holds the cluster token or ticket")]
    TargetAuth,
    #[error("the target speaks protocol versions {0}..={1}, this agent {min}..={max}", min = protocol::MIN_VERSION, max = protocol::VERSION)]
    Version(u16, u16),
    #[error("cancelled")]
    Cancelled,
    #[error("did not converge within the timeout; cancelled")]
    Timeout,
    #[error("guest memory access failed: {0}")]
    Memory(String),
    #[error(
        "the connection broke after Complete was sent; the target may be running the guest, so the source stays paused: {0}"
    )]
    OutcomeUnknown(String),
    #[error(
        "no switchover go-ahead within {0} s; the source stays paused (its disks may be fenced away)"
    )]
    SwitchoverTimeout(u64),
    #[error("aborted while quiesced; the source stays paused (its disks may be fenced away)")]
    Aborted,
}

impl SendError {
    fn code(&self) -> &'static str {
        match self {
            SendError::Wire(WireError::Remote { code, .. }) => code.as_str(),
            SendError::Wire(_) => "connection",
            SendError::Vm(_) => "vm",
            SendError::TargetAuth => "auth_failed",
            SendError::Version(..) => "version",
            SendError::Cancelled => "cancelled",
            SendError::Timeout => "timeout",
            SendError::Memory(_) => "memory",
            SendError::OutcomeUnknown(_) => "outcome_unknown",
            SendError::SwitchoverTimeout(_) => "switchover_timeout",
            SendError::Aborted => "aborted",
        }
    }
}

/// Runs a migration to its end and records the outcome; called on a dedicated thread.
pub fn run(
    out: Arc<Outgoing>,
    host: Arc<dyn VmHost>,
    name: String,
    src: Arc<dyn MigrationSource>,
    was_running: bool,
    params: SendParams,
) {
    let mut progress = Progress::default();
    let result = migrate(&out, src.as_ref(), &params, &mut progress);
    let Progress {
        paused,
        logging,
        quiesced,
    } = progress;
    let total = out.started.elapsed();
    // Whatever happened, the window takes no go-ahead or cancel any more. A cancel it
    // accepted stands even if the stream failed afterwards: the coordinator cancels
    // only when it did not fence, so the source may (and must) run again.
    let cancel_accepted = out.with_window(|w| {
        if matches!(w, Window::Cancelled) {
            return true;
        }
        *w = if result.is_ok() {
            Window::Closed
        } else {
            Window::Failed
        };
        false
    });
    match result {
        Ok(()) => {
            host.end_outgoing(&name, true);
            out.update(|i| {
                i.state = MigrationState::Completed;
                i.total_ms = ms(total);
                i.remaining_bytes = 0;
            });
            tracing::info!(vm = %name, total_ms = ms(total), "migration completed");
        }
        Err(e) => {
            src.set_throttle(0);
            if logging && let Err(err) = src.stop_dirty_log() {
                tracing::warn!(vm = %name, %err, "stopping the dirty log after a failed migration");
            }
            let cancelled = matches!(e, SendError::Cancelled) || cancel_accepted;
            // Once quiesced, only a cancel (before the go-ahead) may resume the source;
            // after a lost Complete answer the target may run the guest.
            let keep_paused = matches!(e, SendError::OutcomeUnknown(_)) || (quiesced && !cancelled);
            if keep_paused {
                host.end_outgoing_paused(&name);
            } else {
                if paused
                    && was_running
                    && let Err(err) = src.resume()
                {
                    tracing::error!(vm = %name, %err, "resuming the source after a failed migration");
                }
                host.end_outgoing(&name, false);
            }
            let state = if cancelled {
                MigrationState::Cancelled
            } else {
                MigrationState::Failed
            };
            tracing::warn!(vm = %name, error = %e, ?state, keep_paused, "migration did not complete; guest stays on the source");
            out.update(|i| {
                i.state = state;
                i.total_ms = ms(total);
                i.error = Some(ErrorInfo {
                    code: e.code().to_string(),
                    message: e.to_string(),
                });
            });
        }
    }
}

/// What the sender changed on the source, so that a failure undoes exactly that.
#[derive(Default)]
struct Progress {
    paused: bool,
    logging: bool,
    /// Coordinated mode: the source reported `quiesced` (it must not resume on its own).
    quiesced: bool,
}

/// Shared by the stream workers of a pass.
struct PassCtx<'a> {
    mem: &'a GuestMemoryMmap<AtomicBitmap>,
    digests: &'a ChunkDigests,
    dirty: &'a [u64],
    chunks: &'a [u64],
    next: AtomicUsize,
    skip_zero: bool,
    /// Pass 0 only: pages the guest ever populated (`resident::populated`).
    populated: Option<&'a [u64]>,
    out: &'a Outgoing,
    limiter: &'a Mutex<RateLimiter>,
    compression: Compression,
    pass: u32,
    /// Cancel checks are off once the guest is paused: stop and copy runs to the end.
    cancellable: bool,
}

fn migrate(
    out: &Outgoing,
    src: &dyn MigrationSource,
    p: &SendParams,
    progress: &mut Progress,
) -> Result<(), SendError> {
    let spec = src.spec();
    let mem = src.guest_memory();
    let mem_size = spec.memory_mib << 20;
    let pages = mem_size / PAGE_SIZE;
    let streams = p.streams.clamp(1, 64);

    // Setup: control connection, Config, data connections.
    let mut control = connect(&p.target, p)?;
    control.send(
        &Message::Config {
            chunk_size: CHUNK_SIZE,
            streams,
            switchover: p.switchover,
            switchover_timeout_s: u32::try_from(p.switchover_timeout.as_secs()).unwrap_or(u32::MAX),
            spec: spec.clone(),
        },
        Compression::None,
    )?;
    // While the target creates the VM (tens of ms for a large guest), authenticate the
    // data connections and start dirty logging: none of that sends memory, and all of
    // it used to wait for the answer.
    let t_config = Instant::now();
    let mut data = Vec::with_capacity(usize::from(streams) - 1);
    for _ in 1..streams {
        data.push(connect(&p.target, p)?);
    }
    src.start_dirty_log()?;
    progress.logging = true;
    // Read after the dirty log started: a page populated later is in a dirty set.
    let populated = super::resident::populated(mem);
    let t_answer = Instant::now();
    let session: [u8; ID_LEN] = control
        .expect_ok()?
        .try_into()
        .map_err(|_| WireError::Unexpected(protocol::Command::Ok))?;
    let config_wait_ms = ms(t_answer.elapsed());
    let mut conns = vec![control];
    for mut c in data {
        c.send(&Message::Join { session }, Compression::None)?;
        c.expect_ok()?;
        conns.push(c);
    }
    let setup = out.started.elapsed();
    out.update(|i| {
        i.setup_ms = ms(setup);
        i.state = MigrationState::Active;
    });
    tracing::info!(vm = %spec.name, target = %p.target, streams, setup_ms = ms(setup),
        overlapped_ms = ms(t_answer - t_config), config_wait_ms, "migration set up");

    let digests = ChunkDigests::zeroed(mem_size, CHUNK_SIZE);
    let limiter = Mutex::new(RateLimiter::new());
    let mut precopy = Precopy::new();
    let mut dirty = bitmap::all(pages);
    let mut pass: u32 = 0;
    loop {
        if out.cancel_requested() {
            abandon(&mut conns[0], "cancelled");
            return Err(SendError::Cancelled);
        }
        let t = Instant::now();
        let bytes = run_pass(
            &mut conns,
            &PassCtx {
                mem,
                digests: &digests,
                dirty: &dirty,
                chunks: &bitmap::dirty_chunks(&dirty, pages, CHUNK_SIZE / PAGE_SIZE),
                next: AtomicUsize::new(0),
                skip_zero: pass == 0,
                populated: if pass == 0 {
                    populated.as_deref()
                } else {
                    None
                },
                out,
                limiter: &limiter,
                compression: p.compression,
                pass,
                cancellable: true,
            },
            pages,
        )
        .inspect_err(|e| {
            if matches!(e, SendError::Cancelled) {
                abandon(&mut conns[0], "cancelled");
            }
        })?;
        let duration = t.elapsed();
        dirty = bitmap::from_pages(&src.take_dirty_pages()?, pages);
        let dirty_pages = bitmap::count(&dirty, pages);
        let limits = out.limits();
        let decision = precopy.after_pass(
            &limits,
            PassReport {
                bytes,
                duration,
                dirty_bytes: dirty_pages * PAGE_SIZE,
            },
            out.started.elapsed(),
        );
        src.set_throttle(precopy.throttle());
        let throttle = precopy.throttle();
        out.counters
            .pass_pending
            .store(dirty_pages * PAGE_SIZE, Ordering::Relaxed);
        out.update(|i| {
            i.passes.push(PassInfo {
                bytes,
                duration_ms: ms(duration),
                dirty_pages,
                throttle_percent: throttle,
            });
            i.bandwidth_mibs = precopy.bandwidth() / 1048576.0;
            i.dirty_rate_pages_per_s = dirty_pages as f64 / duration.as_secs_f64().max(1e-6);
            i.throttle_percent = throttle;
            i.expected_downtime_ms = ms(precopy
                .expected_downtime(dirty_pages * PAGE_SIZE)
                .min(Duration::from_secs(1 << 30)));
        });
        tracing::debug!(
            pass,
            bytes,
            dirty_pages,
            ?duration,
            ?decision,
            "pre-copy pass"
        );
        pass += 1;
        match decision {
            Decision::Iterate => continue,
            Decision::Held => {
                // Nothing left to gain from back-to-back passes over a small set: pace
                // them so a held migration costs little CPU while it waits.
                if let Some(rest) = HELD_PASS_INTERVAL.checked_sub(duration) {
                    std::thread::sleep(rest);
                }
                continue;
            }
            Decision::SwitchOver { forced } => {
                tracing::info!(pass, forced, dirty_pages, "switching over");
                break;
            }
            Decision::Cancel => {
                abandon(&mut conns[0], "did not converge within the timeout");
                return Err(SendError::Timeout);
            }
        }
    }

    // Stop and copy.
    let coordinated = p.switchover == SwitchoverMode::Coordinated;
    if !coordinated {
        out.update(|i| i.state = MigrationState::Device);
    }
    let t_pause = Instant::now();
    src.pause()?;
    progress.paused = true;
    let t_paused = Instant::now();
    if coordinated {
        // Paused means drained and flushed: the coordinator may fence from now on, so
        // the window opens before anyone can see `quiesced`.
        progress.quiesced = true;
        let at = ms(out.started.elapsed());
        out.with_window(|w| {
            *w = if out.cancel_requested() {
                Window::Cancelled
            } else {
                Window::Open
            };
            out.update(|i| {
                i.state = MigrationState::Quiesced;
                i.quiesced_at_ms = Some(at);
            });
        });
        tracing::info!(vm = %spec.name, "source quiesced; waiting for the switchover go-ahead");
    }
    let mut last = bitmap::from_pages(&src.take_dirty_pages()?, pages);
    bitmap::or_into(&mut last, &dirty);
    out.counters
        .pass_pending
        .store(bitmap::count(&last, pages) * PAGE_SIZE, Ordering::Relaxed);
    let bytes = run_pass(
        &mut conns,
        &PassCtx {
            mem,
            digests: &digests,
            dirty: &last,
            chunks: &bitmap::dirty_chunks(&last, pages, CHUNK_SIZE / PAGE_SIZE),
            next: AtomicUsize::new(0),
            skip_zero: false,
            populated: None,
            out,
            limiter: &limiter,
            compression: p.compression,
            pass,
            cancellable: false,
        },
        pages,
    )?;
    let t_final = Instant::now();
    let control = &mut conns[0];
    let state = src.save_state()?;
    control.send(&Message::State { state }, Compression::None)?;
    control.expect_ok()?;
    let t_state = Instant::now();
    control.send(
        &Message::Digests {
            chunk_size: CHUNK_SIZE,
            digests: digests.snapshot(),
        },
        Compression::None,
    )?;
    control.expect_ok()?;
    let t_verify = Instant::now();
    let mut t_go = t_verify;
    if coordinated {
        let disks = match wait_go_ahead(out, control, t_paused + p.switchover_timeout) {
            Ok(d) => d,
            Err(e) => {
                let reason = if matches!(e, SendError::Cancelled) {
                    "cancelled"
                } else {
                    "no switchover go-ahead"
                };
                abandon(control, reason);
                return Err(e);
            }
        };
        t_go = Instant::now();
        control.send(&Message::Switchover { disks }, Compression::None)?;
        control.expect_ok()?;
    }
    control
        .send(&Message::Complete, Compression::None)
        .map_err(|e| SendError::OutcomeUnknown(e.to_string()))?;
    match control.expect_ok() {
        Ok(_) => {}
        Err(WireError::Remote { code, message }) => {
            return Err(WireError::Remote { code, message }.into());
        }
        Err(e) => return Err(SendError::OutcomeUnknown(e.to_string())),
    }
    let t_done = Instant::now();
    if let Err(e) = src.stop_dirty_log() {
        tracing::warn!(error = %e, "stopping the dirty log after the switchover");
    }
    out.update(|i| {
        i.passes.push(PassInfo {
            bytes,
            duration_ms: ms(t_final - t_paused),
            dirty_pages: bytes / PAGE_SIZE,
            throttle_percent: precopy.throttle(),
        });
        i.downtime_ms = ms(t_done - t_pause);
        let switchover_wait_ms = match (i.quiesced_at_ms, i.go_ahead_at_ms) {
            (Some(q), Some(g)) => (g - q).max(0.0) + ms(t_paused - t_pause),
            _ => 0.0,
        };
        i.downtime = Downtime {
            pause_ms: ms(t_paused - t_pause),
            final_pages_ms: ms(t_final - t_paused),
            state_ms: ms(t_state - t_final),
            verify_ms: ms(t_verify - t_state),
            switchover_wait_ms,
            complete_ms: ms(t_done - t_go),
        };
    });
    for c in &conns {
        c.shutdown();
    }
    Ok(())
}

/// Quiesced and verified: waits for the go-ahead's disk URIs, a cancel, the deadline,
/// or the target vanishing (checked on the idle control connection every 50 ms).
fn wait_go_ahead(
    out: &Outgoing,
    control: &mut Conn,
    deadline: Instant,
) -> Result<Vec<crate::contract::DiskSpec>, SendError> {
    let mut next_probe = Instant::now();
    loop {
        let got = out.with_window(|w| match w {
            Window::GoAhead(d) => Some(Ok(d.clone())),
            Window::Cancelled => Some(Err(SendError::Cancelled)),
            Window::Aborted => Some(Err(SendError::Aborted)),
            _ if Instant::now() >= deadline => {
                // Closed under the lock: a go-ahead racing the deadline gets a 409.
                *w = Window::Failed;
                Some(Err(SendError::SwitchoverTimeout(
                    out.info
                        .lock()
                        .expect("info lock is never poisoned")
                        .switchover_timeout_s,
                )))
            }
            _ => None,
        });
        if let Some(r) = got {
            return r;
        }
        let now = Instant::now();
        if now >= next_probe {
            control.check_idle_peer()?;
            next_probe = now + Duration::from_millis(50);
        }
        // Short: the wait for the go-ahead is part of the guest's downtime.
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn abandon(c: &mut Conn, reason: &str) {
    // Best effort: if the connection is gone the receiver discards the VM anyway.
    let _ = c.send(
        &Message::Abandon {
            reason: reason.to_string(),
        },
        Compression::None,
    );
}

/// Connects and runs the mutual challenge-response (see `protocol`).
fn connect(target: &str, p: &SendParams) -> Result<Conn, SendError> {
    let addr = target
        .to_socket_addrs()
        .map_err(WireError::Io)?
        .next()
        .ok_or_else(|| {
            WireError::Io(std::io::Error::other(format!(
                "{target} resolves to no address"
            )))
        })?;
    let stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(WireError::Io)?;
    let stream = match &p.tls {
        None => Stream::Plain(stream),
        Some(cfg) => {
            let name = stagehand_common::tls::server_name(target)
                .map_err(|e| WireError::Io(std::io::Error::other(e)))?;
            Stream::client(stream, cfg.clone(), name).map_err(WireError::Io)?
        }
    };
    let mut c = Conn::with_stream(stream).map_err(WireError::Io)?;
    let Message::Challenge {
        version_min,
        version_max,
        nonce: nonce_r,
    } = c.recv()?
    else {
        return Err(WireError::Unexpected(protocol::Command::Invalid).into());
    };
    let version = version_max.min(protocol::VERSION);
    if version < version_min || version < protocol::MIN_VERSION {
        return Err(SendError::Version(version_min, version_max));
    }
    let key = auth::derive_key(&p.secret);
    let mut nonce_s = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce_s);
    let proof = auth::sender_proof(&key, &nonce_r, &nonce_s);
    c.send(
        &Message::Hello {
            version,
            auth: p.auth,
            nonce: nonce_s,
            proof,
        },
        Compression::None,
    )?;
    let answer = c.expect_ok()?;
    if !auth::verify(auth::receiver_proof(&key, &nonce_r, &nonce_s), &answer) {
        return Err(SendError::TargetAuth);
    }
    Ok(c)
}

/// Sends the pages of `ctx.dirty` over all connections, then syncs each; returns the
/// guest bytes sent.
fn run_pass(conns: &mut [Conn], ctx: &PassCtx<'_>, pages: u64) -> Result<u64, SendError> {
    let results: Vec<Result<u64, SendError>> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .map(|c| s.spawn(move || stream_worker(c, ctx, pages)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(SendError::Memory("a stream worker panicked".into())))
            })
            .collect()
    });
    let mut total = 0;
    for r in results {
        total += r?;
    }
    Ok(total)
}

fn stream_worker(conn: &mut Conn, ctx: &PassCtx<'_>, pages: u64) -> Result<u64, SendError> {
    raise_thread_priority();
    let cpu = thread_cpu();
    let r = stream_pages(conn, ctx, pages);
    let used = thread_cpu().saturating_sub(cpu);
    ctx.out.counters.cpu_ns.fetch_add(
        u64::try_from(used.as_nanos()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    r
}

fn stream_pages(conn: &mut Conn, ctx: &PassCtx<'_>, pages: u64) -> Result<u64, SendError> {
    let ppc = CHUNK_SIZE / PAGE_SIZE;
    let mut scratch = Vec::with_capacity(CHUNK_SIZE as usize);
    let mut sparse = SparseFrame::default();
    let mut sent = 0u64;
    let counters = &ctx.out.counters;
    loop {
        let i = ctx.next.fetch_add(1, Ordering::Relaxed);
        let Some(&c) = ctx.chunks.get(i) else { break };
        if ctx.cancellable && ctx.out.cancel_requested() {
            return Err(SendError::Cancelled);
        }
        let first = c * ppc;
        let end_page = (first + ppc).min(pages);
        let considered = (first..end_page)
            .filter(|p| bitmap::is_set(ctx.dirty, *p))
            .count() as u64;
        let pending = |n: u64| {
            let _ = counters
                .pass_pending
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(n * PAGE_SIZE))
                });
        };
        // Pass 0: a chunk the guest never populated is zero; no need to read it.
        if ctx
            .populated
            .is_some_and(|p| !bitmap::any_in(p, first, end_page))
        {
            ctx.digests.record_zero(c);
            counters.zero_pages.fetch_add(considered, Ordering::Relaxed);
            pending(considered);
            continue;
        }
        let (start, len) = ctx.digests.chunk_range(c);
        scratch.resize(len as usize, 0);
        ctx.mem
            .read_slice(&mut scratch, GuestAddress(start))
            .map_err(|e| SendError::Memory(e.to_string()))?;
        // Hashed after the dirty set holding these pages was collected (see `digest`),
        // in the same single scan that classifies the pages for the wire.
        let mut ranges: Vec<MemRange> = Vec::new();
        sparse.clear();
        let mut bytes = 0u64;
        let mut zero = 0u64;
        let digest = scan_chunk(&scratch, |i, scan| {
            let page = first + i as u64;
            if !bitmap::is_set(ctx.dirty, page) {
                return;
            }
            let gpa = page * PAGE_SIZE;
            match scan {
                PageScan::Sparse([]) if ctx.skip_zero => zero += 1,
                // A page that is zero but for a few words travels as those words.
                PageScan::Sparse(words) => sparse.push(gpa, words),
                PageScan::Dense => {
                    match ranges.last_mut() {
                        Some(r) if r.gpa + r.len == gpa => r.len += PAGE_SIZE,
                        _ => ranges.push(MemRange {
                            gpa,
                            len: PAGE_SIZE,
                        }),
                    }
                    bytes += PAGE_SIZE;
                }
            }
        });
        ctx.digests.set(c, digest);
        counters.zero_pages.fetch_add(zero, Ordering::Relaxed);
        if sparse.pages() > 0 {
            let n = u64::from(sparse.pages());
            let frame = sparse.finish();
            throttle_send(ctx, frame.len() as u64)?;
            let wire = conn.send_parts([frame])?;
            counters
                .wire_bytes
                .fetch_add(wire as u64, Ordering::Relaxed);
            counters
                .ram_bytes
                .fetch_add(n * PAGE_SIZE, Ordering::Relaxed);
            counters.normal_pages.fetch_add(n, Ordering::Relaxed);
            sent += n * PAGE_SIZE;
        }
        if !ranges.is_empty() {
            let slices = ranges.iter().map(|r| {
                let off = (r.gpa - start) as usize;
                &scratch[off..off + r.len as usize]
            });
            // The cap counts wire bytes, so compression buys real headroom on a link.
            let wire = if ctx.compression == Compression::None {
                // Straight from the chunk copy: no frame buffer.
                let prefix = protocol::memory_frame_prefix(&ranges, bytes);
                throttle_send(ctx, prefix.len() as u64 + bytes)?;
                conn.send_parts(std::iter::once(&prefix[..]).chain(slices))?
            } else {
                let mut data = Vec::with_capacity(bytes as usize);
                slices.for_each(|s| data.extend_from_slice(s));
                let frame = Message::Memory { ranges, data }.encode(ctx.compression);
                throttle_send(ctx, frame.len() as u64)?;
                conn.send_parts([&frame[..]])?
            };
            counters
                .wire_bytes
                .fetch_add(wire as u64, Ordering::Relaxed);
            counters.ram_bytes.fetch_add(bytes, Ordering::Relaxed);
            counters
                .normal_pages
                .fetch_add(bytes / PAGE_SIZE, Ordering::Relaxed);
            sent += bytes;
        }
        pending(considered);
    }
    let wire = conn.send(&Message::Sync { pass: ctx.pass }, Compression::None)?;
    counters
        .wire_bytes
        .fetch_add(wire as u64, Ordering::Relaxed);
    conn.expect_ok()?;
    Ok(sent)
}

/// Waits as the bandwidth cap requires, re-reading the cap and checking for cancel at
/// least every 50 ms so that PATCH and cancel act quickly even on a slow link.
fn throttle_send(ctx: &PassCtx<'_>, bytes: u64) -> Result<(), SendError> {
    let mut cap = ctx.out.limits().max_bandwidth_mibs;
    let now = Instant::now();
    let mut until = now
        + ctx
            .limiter
            .lock()
            .expect("limiter lock is never poisoned")
            .reserve(now, bytes, cap);
    loop {
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        if ctx.cancellable && ctx.out.cancel_requested() {
            return Err(SendError::Cancelled);
        }
        let new_cap = ctx.out.limits().max_bandwidth_mibs;
        if new_cap != cap {
            // The cap changed: forget the old schedule and reserve at the new rate.
            cap = new_cap;
            let mut l = ctx.limiter.lock().expect("limiter lock is never poisoned");
            *l = RateLimiter::new();
            until = now + l.reserve(now, bytes, cap);
            continue;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

/// Error code for a `VmError` on the receiver side.
pub(crate) fn vm_error_code(e: &VmError) -> ErrorCode {
    match e {
        VmError::Incompatible(_) => ErrorCode::Incompatible,
        VmError::BadState(_) => ErrorCode::RestoreFailed,
        _ => ErrorCode::Internal,
    }
}
