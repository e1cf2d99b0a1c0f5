//! The replicated store: etcd v3 through `etcd-client`.
//!
//! Keys: `<prefix>data/<table>/<key>` for records, `<prefix>leader` for the election.
//! Values are the same JSON documents as in RocksDB.
//!
//! Election: each `coord serve` grants itself a lease (`--election-ttl`, default 2 s)
//! and tries to create the leader key on it in a transaction (`create_revision == 0`).
//! The winner leads and keeps the lease alive; the others poll the key and follow.
//! Every write the leader makes is one transaction conditional on the leader key's
//! create revision still being the one it created: once its lease expired (it was
//! paused, cut off, or lost quorum) and another coordinator took the key, nothing it
//! sends lands. The leader also steps down by its own clock when no keep-alive has
//! been confirmed for a whole TTL.
//!
//! Reads are linearizable; when etcd cannot serve those (no quorum), they fall back to
//! the member's own (serializable) copy, so the coordinators keep answering reads.
//!
//! The rest of the coordinator is synchronous over the store (as over RocksDB), so
//! each call is run on this store's own small runtime and waited for (inside
//! `block_in_place` on a multi-threaded runtime); every call has a timeout.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::watch;

use super::{Backend, Batch, Expect, LeaderInfo, Member, Role, StoreError, StoreHealth, TABLES};

/// A write (or a linearizable read) gives up after this.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// A linearizable read that takes longer falls back to the member's own copy.
const READ_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a follower waits before campaigning again.
const CAMPAIGN_POLL: Duration = Duration::from_millis(100);

/// Keys per page when listing a table.
const LIST_PAGE: i64 = 1000;

/// The end of the key range of every key starting with `prefix` (etcd's
/// `range_end`): the prefix with its last byte below 0xff incremented.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the key space.
    vec![0]
}

/// TLS to etcd: its CA and, for client-certificate auth, our certificate and key.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
    /// Key prefix of this coordinator cluster (default `/stagehand/`).
    pub prefix: String,
}

impl EtcdConfig {
    /// Parses `etcd://h1:2379,h2:2379`.
    pub fn parse(uri: &str, tls: Option<EtcdTls>) -> Result<Self, StoreError> {
        let rest = uri.strip_prefix("etcd://").ok_or_else(|| {
            StoreError::BadUri(format!(
                "{uri:?}: give etcd://HOST:PORT[,HOST:PORT...] (or leave --store out for RocksDB in --data-dir)"
            ))
        })?;
        let rest = rest.trim_end_matches('/');
        let endpoints: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::BadUri(format!("{uri:?} names no etcd member")));
        }
        for e in &endpoints {
            let ok = e
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(StoreError::BadUri(format!(
                    "etcd member {e:?} is not HOST:PORT"
                )));
            }
        }
        Ok(Self {
            endpoints,
            tls,
            prefix: "/stagehand/".into(),
        })
    }

    fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }

    fn options(&self) -> Result<ConnectOptions, StoreError> {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(OP_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(t) = &self.tls {
            let read = |p: &PathBuf| {
                std::fs::read(p)
                    .map_err(|e| StoreError::BadUri(format!("cannot read {}: {e}", p.display())))
            };
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&t.ca)?));
            match (&t.cert, &t.key) {
                (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
                (None, None) => {}
                _ => {
                    return Err(StoreError::BadUri(
                        "--store-cert and --store-key go together".into(),
                    ));
                }
            }
            o = o.with_tls(tls);
        }
        Ok(o)
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

async fn timed<T>(
    d: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(d, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(format!("{what}: {e}"))),
        Err(_) => Err(unavailable(format!(
            "{what}: no answer within {} ms (no quorum, or no member reachable)",
            d.as_millis()
        ))),
    }
}

/// One client per member: tonic's balanced channel keeps sending to a dead member, so
/// calls go to one member and move on to the next when it cannot be reached.
pub(crate) struct Pool {
    clients: Vec<Client>,
    current: std::sync::atomic::AtomicUsize,
}

impl Pool {
    /// Runs `f` on the current member's client; on an error, on the next members'.
    /// A member that does not answer within `d` ends the attempt: it is up but cannot
    /// serve (no quorum), and the others will not do better.
    async fn call<T, Fut>(
        &self,
        d: Duration,
        what: &str,
        f: impl Fn(Client) -> Fut,
    ) -> Result<T, StoreError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        use std::sync::atomic::Ordering;
        let n = self.clients.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = unavailable(format!("{what}: no etcd member configured"));
        for i in 0..n {
            let idx = (start + i) % n;
            match timed(d, what, f(self.clients[idx].clone())).await {
                Ok(v) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) if e.to_string().contains("no answer within") => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// The leader key's create revision while this process leads.
type Guard = Arc<Mutex<Option<i64>>>;

pub struct EtcdStore {
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    pool: Arc<Pool>,
    cfg: EtcdConfig,
    guard: Guard,
    role: watch::Sender<Role>,
    changes: watch::Sender<u64>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `fut` on `handle` and waits for it from synchronous code.
fn block_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    let wait = move || rx.recv();
    let r = match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    };
    r.unwrap_or_else(|_| Err(unavailable("the etcd client stopped")))
}

impl EtcdStore {
    /// Connects (without campaigning: such a store only reads until
    /// [`EtcdStore::start_election`]).
    pub fn connect(cfg: EtcdConfig) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(StoreError::Io)?;
        let handle = rt.handle().clone();
        let urls = cfg.urls();
        let opts = cfg.options()?;
        // Channels spawn their workers on the current runtime: connect on ours. They
        // connect lazily, so a member that is down now does not stop the start.
        let clients = block_on(&handle, async move {
            let mut clients = Vec::new();
            for url in urls {
                clients.push(
                    timed(
                        Duration::from_secs(5),
                        "connecting to etcd",
                        Client::connect([url], Some(opts.clone())),
                    )
                    .await?,
                );
            }
            Ok(clients)
        })?;
        let pool = Arc::new(Pool {
            clients,
            current: std::sync::atomic::AtomicUsize::new(0),
        });
        let (role, _) = watch::channel(Role::Starting);
        let (changes, _) = watch::channel(0);
        let me = Self {
            rt: Some(rt),
            handle,
            pool,
            cfg,
            guard: Arc::new(Mutex::new(None)),
            role,
            changes,
        };
        me.spawn_watch();
        Ok(me)
    }

    fn data_key(&self, table: &str, key: &str) -> Result<String, StoreError> {
        if !TABLES.contains(&table) {
            return Err(StoreError::UnknownTable(table.to_owned()));
        }
        Ok(format!("{}data/{table}/{key}", self.cfg.prefix))
    }

    fn leader_key(&self) -> String {
        format!("{}leader", self.cfg.prefix)
    }

    /// Bumps the change counter on every change under the prefix (re-watching after
    /// errors).
    fn spawn_watch(&self) {
        let pool = Arc::clone(&self.pool);
        let prefix = self.cfg.prefix.clone();
        let changes = self.changes.clone();
        self.handle.spawn(async move {
            loop {
                let watch = pool
                    .call(OP_TIMEOUT, "watching", |mut c| {
                        let prefix = prefix.clone();
                        async move {
                            c.watch(prefix, Some(WatchOptions::new().with_prefix()))
                                .await
                        }
                    })
                    .await;
                match watch {
                    Ok(mut stream) => {
                        while let Ok(Some(resp)) = stream.message().await {
                            if !resp.events().is_empty() {
                                changes.send_modify(|n| *n += 1);
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "etcd watch"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    /// Campaigns for leadership as `id` (API at `url`) on a lease of `ttl`, for as
    /// long as the store lives; the role is published on [`Backend::role`].
    pub fn start_election(&self, id: String, url: String, ttl: Duration) {
        let e = Election {
            pool: Arc::clone(&self.pool),
            key: self.leader_key(),
            id,
            url,
            ttl_secs: ttl.as_secs().max(1) as i64,
            guard: Arc::clone(&self.guard),
            role: self.role.clone(),
        };
        self.handle.spawn(e.run());
    }

    async fn read(
        pool: Arc<Pool>,
        key: String,
        opts: GetOptions,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let get = |opts: GetOptions| {
            let key = key.clone();
            move |mut c: Client| {
                let key = key.clone();
                let opts = opts.clone();
                async move { c.get(key, Some(opts)).await }
            }
        };
        let resp = match pool
            .call(READ_TIMEOUT, "reading from etcd", get(opts.clone()))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "linearizable read failed; reading a member's copy");
                pool.call(
                    OP_TIMEOUT,
                    "reading from etcd",
                    get(opts.with_serializable()),
                )
                .await?
            }
        };
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
            .collect())
    }

    /// Every record under `prefix`, in key order, read in pages of `LIST_PAGE` keys
    /// at the first page's revision (one consistent snapshot): a whole table in one
    /// response would exceed the client's 4 MiB message limit at about 10,000 VMs,
    /// and a huge range is costly for etcd too. Linearizable, falling back to the
    /// member's own copy as [`EtcdStore::read`] does.
    async fn read_prefix(
        pool: Arc<Pool>,
        prefix: String,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        match Self::pages(&pool, &prefix, false, READ_TIMEOUT).await {
            Ok(v) => Ok(v),
            Err(e) => {
                tracing::debug!(error = %e, "linearizable listing failed; reading a member's copy");
                Self::pages(&pool, &prefix, true, OP_TIMEOUT).await
            }
        }
    }

    async fn pages(
        pool: &Pool,
        prefix: &str,
        serializable: bool,
        d: Duration,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            if serializable {
                opts = opts.with_serializable();
            }
            let key = from.clone();
            let resp = pool
                .call(d, "reading from etcd", move |mut c| {
                    let key = key.clone();
                    let opts = opts.clone();
                    async move { c.get(key, Some(opts)).await }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let kvs = resp.kvs();
            out.extend(
                kvs.iter()
                    .map(|kv| (kv.key().to_vec(), kv.value().to_vec())),
            );
            match kvs.last() {
                Some(last) if resp.more() => {
                    // The next page starts right after the last key.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    fn current_guard(&self) -> Option<i64> {
        *self.guard.lock().expect("the guard lock is never poisoned")
    }
}

impl Backend for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let k = self.data_key(table, key)?;
        let kvs = block_on(
            &self.handle,
            Self::read(Arc::clone(&self.pool), k, GetOptions::new()),
        )?;
        Ok(kvs.into_iter().next().map(|(_, v)| v))
    }

    fn list(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = format!("{}/", self.data_key(table, "")?.trim_end_matches('/'));
        let kvs = block_on(
            &self.handle,
            Self::read_prefix(Arc::clone(&self.pool), prefix.clone()),
        )?;
        // etcd returns keys in byte order, as RocksDB iterates them.
        Ok(kvs
            .into_iter()
            .map(|(k, v)| {
                let k = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                (k, v)
            })
            .collect())
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let Some(rev) = self.current_guard() else {
            return Err(StoreError::NotLeader);
        };
        let leader_key = self.leader_key();
        let mut when = vec![Compare::create_revision(
            leader_key.clone(),
            CompareOp::Equal,
            rev,
        )];
        for (table, key, expect) in &batch.expects {
            let k = self.data_key(table, key)?;
            when.push(match expect {
                Expect::Absent => Compare::version(k, CompareOp::Equal, 0),
                Expect::Bytes(b) => Compare::value(k, CompareOp::Equal, b.clone()),
            });
        }
        let mut then = Vec::with_capacity(batch.ops.len());
        for (table, key, value) in &batch.ops {
            let k = self.data_key(table, key)?;
            then.push(match value {
                Some(v) => TxnOp::put(k, v.clone(), None),
                None => TxnOp::delete(k, None),
            });
        }
        let pool = Arc::clone(&self.pool);
        let txn = Txn::new()
            .when(when)
            .and_then(then)
            .or_else(vec![TxnOp::get(leader_key, None)]);
        let resp = block_on(&self.handle, async move {
            pool.call(OP_TIMEOUT, "writing to etcd", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
        })?;
        if resp.succeeded() {
            return Ok(());
        }
        // Failed: either the leader key is no longer ours, or an expectation.
        let still_ours = resp.op_responses().iter().any(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => {
                g.kvs().first().map(|kv| kv.create_revision()) == Some(rev)
            }
            _ => false,
        });
        if !still_ours {
            tracing::warn!("the leader key is gone or another coordinator's: stepping down");
            let mut g = self.guard.lock().expect("the guard lock is never poisoned");
            if *g == Some(rev) {
                *g = None;
                self.role.send_replace(Role::Follower(None));
            }
            return Err(StoreError::NotLeader);
        }
        let (table, key) = batch
            .expects
            .first()
            .map(|(t, k, _)| (t.clone(), k.clone()))
            .unwrap_or_default();
        Err(StoreError::Conflict { table, key })
    }

    fn role(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    fn health(&self) -> StoreHealth {
        let pool = Arc::clone(&self.pool);
        let key = self.leader_key();
        let cfg = self.cfg.clone();
        let r = block_on(&self.handle, async move {
            // A linearizable read needs a quorum: writes would be accepted.
            let quorum = pool
                .call(READ_TIMEOUT, "a linearizable read", |mut c| {
                    let key = key.clone();
                    async move { c.get(key, None).await }
                })
                .await
                .map(|_| ());
            let mut members = Vec::new();
            let list = pool
                .call(READ_TIMEOUT, "listing members", |mut c| async move {
                    c.member_list().await
                })
                .await;
            if let Ok(list) = list {
                for m in list.members() {
                    members.push(Member {
                        name: m.name().to_owned(),
                        urls: m.client_urls().to_vec(),
                        healthy: false,
                    });
                }
            }
            // Each member's own status, through a client of that member alone.
            for m in &mut members {
                let Some(url) = m.urls.first().cloned() else {
                    continue;
                };
                let Ok(opts) = cfg.options() else { continue };
                let one = async {
                    let mut c = Client::connect([url], Some(opts)).await?;
                    c.status().await
                };
                m.healthy = tokio::time::timeout(Duration::from_secs(1), one)
                    .await
                    .is_ok_and(|r| r.is_ok());
            }
            if members.is_empty() {
                // Not even the member list: show the configured endpoints as down.
                members = cfg
                    .endpoints
                    .iter()
                    .map(|e| Member {
                        name: String::new(),
                        urls: vec![e.clone()],
                        healthy: false,
                    })
                    .collect();
            }
            Ok((quorum, members))
        });
        match r {
            Ok((quorum, members)) => StoreHealth {
                kind: "etcd",
                healthy: quorum.is_ok(),
                error: quorum.err().map(|e| e.to_string()),
                members,
            },
            Err(e) => StoreHealth {
                kind: "etcd",
                healthy: false,
                error: Some(e.to_string()),
                members: Vec::new(),
            },
        }
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// One keep-alive round trip (on whichever member answers); the lease's remaining
/// TTL (0: it is gone).
async fn keep_alive(pool: &Pool, lease: i64, limit: Duration) -> Result<i64, StoreError> {
    pool.call(limit, "keeping the lease alive", |mut c| async move {
        let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
        keeper.keep_alive().await?;
        Ok(stream.message().await?.map(|r| r.ttl()).unwrap_or(0))
    })
    .await
}

/// One coordinator's campaign, for the life of the process.
struct Election {
    pool: Arc<Pool>,
    key: String,
    id: String,
    url: String,
    ttl_secs: i64,
    guard: Guard,
    role: watch::Sender<Role>,
}

impl Election {
    async fn run(self) {
        loop {
            if let Err(e) = self.term().await {
                tracing::warn!(error = %e, "election: etcd unavailable; campaigning again");
                self.set_guard(None);
                self.publish(Role::Follower(None));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    fn set_guard(&self, rev: Option<i64>) {
        *self.guard.lock().expect("the guard lock is never poisoned") = rev;
    }

    fn guard_is(&self, rev: i64) -> bool {
        *self.guard.lock().expect("the guard lock is never poisoned") == Some(rev)
    }

    fn publish(&self, role: Role) {
        self.role.send_if_modified(|r| {
            if *r == role {
                false
            } else {
                *r = role;
                true
            }
        });
    }

    /// Waits before the next campaign. A follower campaigns every `CAMPAIGN_POLL`
    /// (one small transaction). Waiting on a watch of the leader key instead (which
    /// saves those transactions) was tried and left the coordinators without a leader
    /// after etcd lost and regained quorum (`coord_etcd`, every run; not understood
    /// yet), so it polls.
    async fn wait_vacancy(&self) {
        tokio::time::sleep(CAMPAIGN_POLL).await;
    }

    /// One lease: campaign on it, lead while it lives, step down; Err when etcd fails.
    async fn term(&self) -> Result<(), StoreError> {
        let ttl_secs = self.ttl_secs;
        let lease = self
            .pool
            .call(OP_TIMEOUT, "granting a lease", |mut c| async move {
                c.lease_grant(ttl_secs, None).await
            })
            .await?
            .id();
        let interval = Duration::from_millis((self.ttl_secs as u64 * 1000 / 3).max(300));
        let ttl = Duration::from_secs(self.ttl_secs as u64);
        let mut last_kept = Instant::now();
        // Campaign.
        let rev = loop {
            let since_ms = crate::model::now_ms();
            let info = LeaderInfo {
                id: self.id.clone(),
                url: self.url.clone(),
                since_ms,
            };
            let value = serde_json::to_vec(&info).unwrap_or_default();
            let txn = Txn::new()
                .when(vec![Compare::create_revision(
                    self.key.clone(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then(vec![TxnOp::put(
                    self.key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else(vec![TxnOp::get(self.key.clone(), None)]);
            let resp = self
                .pool
                .call(OP_TIMEOUT, "campaigning", |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if resp.succeeded() {
                let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                tracing::info!(id = %self.id, "elected leader");
                self.set_guard(Some(rev));
                self.publish(Role::Leader(info));
                break rev;
            }
            let current = resp.op_responses().into_iter().find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .and_then(|kv| serde_json::from_slice::<LeaderInfo>(kv.value()).ok()),
                _ => None,
            });
            self.publish(Role::Follower(current));
            // Campaign again shortly; keep our own lease alive meanwhile.
            self.wait_vacancy().await;
            if last_kept.elapsed() >= interval {
                let sent = Instant::now();
                if keep_alive(&self.pool, lease, interval).await? <= 0 {
                    return Err(unavailable("the campaign's lease expired"));
                }
                last_kept = sent;
            }
        };
        // Lead until the lease cannot be confirmed for a whole TTL, or a write found
        // the key gone.
        loop {
            tokio::time::sleep(interval).await;
            if !self.guard_is(rev) {
                break;
            }
            let sent = Instant::now();
            match keep_alive(&self.pool, lease, interval).await {
                Ok(t) if t > 0 => last_kept = sent,
                Ok(_) => {
                    tracing::warn!("the leader's lease expired: stepping down");
                    break;
                }
                Err(e) => {
                    if last_kept.elapsed() >= ttl {
                        tracing::warn!(error = %e, "no keep-alive confirmed for a TTL: stepping down");
                        break;
                    }
                }
            }
        }
        self.set_guard(None);
        self.publish(Role::Follower(None));
        // Best effort: free the key at once for the next leader.
        let _ = self
            .pool
            .call(
                Duration::from_secs(1),
                "revoking the lease",
                |mut c| async move { c.lease_revoke(lease).await },
            )
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/stagehand/data/vms/"), b"/stagehand/data/vms0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
