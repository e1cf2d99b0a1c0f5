//! The data plane: NBD connections run on a fixed set of threads, each with its own
//! single-threaded tokio runtime, and every connection stays on one of them for its
//! whole life.
//!
//! Why not the process's multi-threaded runtime: a connection is a reader task, a
//! writer task and short request tasks that hand work to each other for every
//! request. On a work-stealing runtime those hand-offs cross threads, and every
//! cross-thread wake-up is an inter-processor interrupt (expensive in a VM, where
//! it is a hypercall). Keeping one connection on one thread turns them into queue
//! pushes on the same core; different connections still spread over all threads
//! (the least-loaded thread gets the next connection). The same reasoning is behind
//! thread-per-core servers (Seastar, glommio) and nbdkit's per-connection threads.
//! Measured with `make bench` (2 cores, loopback, fio nbd engine): see README.md.
//!
//! File I/O that can wait for a device still goes to the I/O engine's own thread
//! ([`crate::io`]); the control API, listeners and signals stay on the main runtime.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::{CancellationToken, DropGuard};

/// One data-plane thread: its runtime's handle and how many connections it serves.
struct Worker {
    handle: Handle,
    load: Arc<AtomicUsize>,
}

/// The data-plane threads. Dropping it stops them (their runtimes shut down and
/// cancel what still runs on them).
pub struct DataPlane {
    workers: Vec<Worker>,
    /// Stops the threads when the data plane is dropped; they are not joined, so a
    /// drop on one of them can never wait for itself.
    _stop: DropGuard,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("threads", &self.workers.len())
            .finish()
    }
}

/// The default thread count: one per CPU this process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl DataPlane {
    /// Starts `threads` (at least one) data-plane threads.
    pub fn start(threads: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.push(Worker {
                handle: rt.handle().clone(),
                load: Arc::new(AtomicUsize::new(0)),
            });
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("nbd-data-{i}"))
                .spawn(move || {
                    // Drives every task spawned on this runtime until told to stop;
                    // dropping the runtime then cancels what is left.
                    rt.block_on(stop.cancelled());
                })?;
        }
        Ok(Self {
            workers,
            _stop: stop.drop_guard(),
        })
    }

    /// How many data-plane threads run.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Runs the future made by `make` on the least-loaded data-plane thread, tracked
    /// in `set`. `make` runs on that thread, so I/O objects it creates (for example
    /// `TcpStream::from_std`) register with that thread's reactor.
    pub fn spawn<F, M>(&self, set: &mut JoinSet<()>, make: M) -> AbortHandle
    where
        M: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let w = self
            .workers
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
            .unwrap_or_else(|| unreachable!("a data plane has at least one thread"));
        let load = Arc::clone(&w.load);
        load.fetch_add(1, Ordering::Relaxed);
        set.spawn_on(
            async move {
                let _count = LoadGuard(load);
                make().await;
            },
            &w.handle,
        )
    }
}

struct LoadGuard(Arc<AtomicUsize>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spreads_connections_and_keeps_each_on_one_thread() {
        let dp = DataPlane::start(2).unwrap();
        assert_eq!(dp.threads(), 2);
        let mut set = JoinSet::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Holds every connection open until all have reported (a token, not a
        // Notify: a task that has not started waiting yet must still see it).
        let gate = CancellationToken::new();
        for _ in 0..4 {
            let tx = tx.clone();
            let gate = gate.clone();
            dp.spawn(&mut set, move || async move {
                let before = std::thread::current().name().map(str::to_owned);
                // A task spawned from the connection runs on the same thread.
                let inner =
                    tokio::spawn(async { std::thread::current().name().map(str::to_owned) });
                let inner = inner.await.unwrap();
                let _ = tx.send((before, inner));
                gate.cancelled().await;
            });
        }
        drop(tx);
        let mut names = Vec::new();
        for _ in 0..4 {
            let (outer, inner) = rx.recv().await.unwrap();
            assert_eq!(outer, inner, "a connection's tasks stay on its thread");
            names.push(outer.unwrap());
        }
        names.sort();
        assert_eq!(
            names,
            ["nbd-data-0", "nbd-data-0", "nbd-data-1", "nbd-data-1"]
        );
        gate.cancel();
        while set.join_next().await.is_some() {}
    }
}
