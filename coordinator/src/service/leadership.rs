//! Leadership: which coordinator drives migrations and writes the store.
//!
//! With RocksDB the one process leads from the start. With etcd the store's election
//! decides: the leader runs the executors (a new term re-drives every unfinished
//! migration from the journal, exactly as a restart does); a follower serves reads
//! and forwards writes to the leader (`api.rs`). When the term ends, its executors
//! stop at their next step; whatever they still try to write is refused by the
//! store's leader-guarded transactions.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::Coordinator;
use crate::error::ApiError;
use crate::store::{LeaderInfo, Role};

/// The first and the longest wait between attempts to read the journal at the start
/// of a term.
const RECOVER_RETRY_FIRST: Duration = Duration::from_millis(500);
const RECOVER_RETRY_MAX: Duration = Duration::from_secs(8);

impl Coordinator {
    pub(crate) fn current_term(&self) -> CancellationToken {
        self.term
            .lock()
            .expect("term lock is never poisoned")
            .clone()
    }

    /// The role as last published by the store.
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    pub fn is_leader(&self) -> bool {
        matches!(*self.role.borrow(), Role::Leader(_))
    }

    /// The leader, when known (this process or another).
    pub fn leader(&self) -> Option<LeaderInfo> {
        match &*self.role.borrow() {
            Role::Leader(i) => Some(i.clone()),
            Role::Follower(l) => l.clone(),
            Role::Starting => None,
        }
    }

    /// Starts or ends a term to match `role`.
    pub fn apply_role(self: &Arc<Self>, role: &Role) {
        let leading = matches!(role, Role::Leader(_));
        let mut term = self.term.lock().expect("term lock is never poisoned");
        match (leading, term.is_cancelled()) {
            (true, true) => {
                *term = self.shutdown.child_token();
                drop(term);
                tracing::info!(
                    store = self.store.kind(),
                    "leading: driving unfinished migrations"
                );
                match self.recover() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(migrations = n, "driving unfinished migrations again"),
                    Err(e) => {
                        // The term stays: the next role change or a retry below drives
                        // them; meanwhile new migrations work.
                        tracing::error!(error = %e, "cannot read the migration journal");
                        let me = Arc::clone(self);
                        tokio::spawn(async move { me.retry_recover().await });
                    }
                }
            }
            (false, false) => {
                tracing::warn!("no longer leading: stopping this coordinator's executors");
                term.cancel();
            }
            _ => {}
        }
    }

    /// Retries reading the journal with exponential backoff (0.5 s doubling up to
    /// 8 s): the store is down or has no quorum, and a tight loop of reads would only
    /// add to its load while it recovers.
    async fn retry_recover(self: Arc<Self>) {
        let term = self.current_term();
        let mut delay = RECOVER_RETRY_FIRST;
        while !term.is_cancelled() {
            tokio::select! {
                _ = term.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            match self.recover() {
                Ok(n) => {
                    tracing::info!(
                        migrations = n,
                        "read the journal: driving unfinished migrations"
                    );
                    return;
                }
                Err(e) => {
                    delay = (delay * 2).min(RECOVER_RETRY_MAX);
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot read the migration journal yet");
                }
            }
        }
    }

    /// Follows the store's role for the life of the process.
    pub async fn follow_role(self: Arc<Self>) {
        let mut rx = self.role.clone();
        loop {
            let role = rx.borrow_and_update().clone();
            self.apply_role(&role);
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }

    /// `GET /v1/status`: who leads and since when, this coordinator's part, and the
    /// store's kind, health and members.
    pub fn status(&self, me: &str) -> Value {
        let role = self.role();
        let (role_name, leader) = match &role {
            // The embedded store's owner: name it as configured.
            Role::Leader(i) if i.url.is_empty() => (
                "leader",
                Some(LeaderInfo {
                    id: me.to_owned(),
                    ..i.clone()
                }),
            ),
            Role::Leader(i) => ("leader", Some(i.clone())),
            Role::Follower(l) => ("follower", l.clone()),
            Role::Starting => ("starting", None),
        };
        let health = self.store.health();
        json!({
            "coordinator": {"id": me, "role": role_name},
            "leader": leader,
            "store": health,
            "refused_writes": self.store.refused_writes(),
            "driving": self.running.lock().map(|r| r.len()).unwrap_or(0),
        })
    }

    /// A write that reached a follower: sent on to the leader as it came (method,
    /// path and query, the caller's Authorization and body); the leader's answer is
    /// returned as is.
    pub async fn forward(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        authorization: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), ApiError> {
        let Some(leader) = self.leader() else {
            return Err(self.no_leader());
        };
        let url = format!("{}{path_and_query}", leader.url.trim_end_matches('/'));
        let mut req = self
            .http
            .request(method, &url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(a) = authorization {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        let resp = req.send().await.map_err(|e| {
            ApiError::new(
                503,
                "leader_unreachable",
                format!(
                    "This coordinator follows {} at {}, which does not answer ({}); retry shortly (a new leader is elected within a few seconds).",
                    leader.id,
                    leader.url,
                    stagehand_common::report::error_line(&e)
                ),
            )
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| {
            ApiError::new(
                502,
                "leader_bad_answer",
                format!("The leader {} broke off its answer: {e}", leader.id),
            )
        })?;
        Ok((status, bytes.to_vec()))
    }

    /// The error of a write when nobody leads.
    pub(crate) fn no_leader(&self) -> ApiError {
        let health = self.store.health();
        let why = health
            .error
            .map(|e| format!(" The state store says: {e}."))
            .unwrap_or_default();
        ApiError::new(
            503,
            "no_leader",
            format!(
                "No coordinator leads right now, so writes are refused (reads still work).{why} Retry when the {} cluster has a quorum again.",
                health.kind
            ),
        )
    }
}
