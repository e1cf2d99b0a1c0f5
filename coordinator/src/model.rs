//! Inventory records as stored (JSON in the store's column families) and as served by
//! the API. Secrets (daemon tokens, lease tokens) live in the records but are skipped
//! when a record is shown: see the `*View` conversions in `api.rs`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use stagehand_common::secret::Secret;

use crate::migration::MigrationRecord;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Site {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StorageNode {
    pub name: String,
    pub site: String,
    /// Base URL of the node's control API, e.g. `http://10.0.0.5:7080`.
    pub api: String,
    /// The node's NBD listener `HOST:PORT` (what hosts connect to).
    pub nbd: String,
    /// Sites other than its own whose hosts reach it (shared storage across sites).
    #[serde(default)]
    pub reachable_from: Vec<String>,
    /// Directory on the storage node where the coordinator creates disk files; None:
    /// the node's own export root (the export is created without a path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_dir: Option<String>,
    /// Token for this node's API when it differs from the cluster token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
}

impl StorageNode {
    pub fn reaches(&self, site: &str) -> bool {
        self.site == site || self.reachable_from.iter().any(|s| s == site)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub site: String,
    /// Base URL of the agent's API.
    pub api: String,
    /// The agent's migration listener `HOST:PORT`.
    pub migration: String,
    /// Guest memory this host may hold, MiB (`--memory`; placement uses the smaller of
    /// this and what the agent reports it offers).
    pub memory_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// Unschedulable: `coord host drain` (maintenance) or emptied by `coord consolidate`
    /// (stand-by, may be powered down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained: Option<crate::plan::Drain>,
    /// The agent's last `GET /v1/host`, as the coordinator polled it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<HostReport>,
}

/// What an agent reports about its host (`GET /v1/host`), kept in the host record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct HostReport {
    #[serde(default)]
    pub memory_mib_total: u64,
    #[serde(default)]
    pub memory_mib_for_guests: u64,
    #[serde(default)]
    pub memory_mib_used: u64,
    #[serde(default)]
    pub vcpus: u32,
    #[serde(default)]
    pub cpu: HostCpu,
    #[serde(default)]
    pub guests: Vec<GuestUsage>,
    /// Unix ms when the coordinator received it.
    #[serde(default)]
    pub received_ms: u64,
}

impl Eq for HostReport {}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct HostCpu {
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct GuestUsage {
    pub name: String,
    #[serde(default)]
    pub memory_mib: u64,
    #[serde(default)]
    pub cpu_percent: f64,
    #[serde(default)]
    pub dirty_mib_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Disk {
    pub storage: String,
    pub export: String,
    pub size_bytes: u64,
    /// Lease epoch and holder as last confirmed by the storage node.
    pub epoch: u64,
    pub holder: String,
    /// The holder's lease token (never shown by the API, never logged; `Debug`
    /// prints `<redacted>`). None when the coordinator does not know it (a roll
    /// forward to a lease the target got before a crash). Stored as a string, "" for
    /// None.
    #[serde(default, serialize_with = "token_out", deserialize_with = "token_in")]
    pub token: Option<Secret>,
}

fn token_out<S: Serializer>(t: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.as_ref().map(Secret::expose).unwrap_or(""))
}

fn token_in<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    let s = String::deserialize(d)?;
    Ok(Secret::new(s).ok())
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Migrating,
    /// A step failed in a way the coordinator could not settle by itself.
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vm {
    pub name: String,
    pub site: String,
    pub host: String,
    pub state: VmState,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// The guest's flat binary (a path on the hosts) and where it is loaded.
    pub image: String,
    pub load_addr: u64,
    pub disks: Vec<Disk>,
    /// The migration in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// `coord vm pin`: balance and consolidate never move it, evacuate names it.
    #[serde(default)]
    pub pinned: bool,
    /// The CPU fingerprint of the host it was started on (the features it sees);
    /// it moves only to hosts reporting the same. None: not known (created before
    /// hosts reported one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_fingerprint: Option<String>,
}

/// Options of one migration, as requested.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct MigrationOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mibs: Option<u64>,
    #[serde(default)]
    pub offline: bool,
    /// Hold the switchover: pre-copy goes on until `POST /v1/migrations/{id}/release`
    /// (or a cancel). Cleared once the release reached the source agent.
    #[serde(default)]
    pub hold: bool,
}

/// Figures of a migration, copied from the source agent's statistics as it runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct MigrationFigures {
    pub total_ms: u64,
    pub downtime_ms: u64,
    /// How long the fence calls to the storage node took (inside the downtime: the
    /// guest is paused while the coordinator fences).
    pub fence_ms: u64,
    /// The same in microseconds (a local fence takes well under a millisecond).
    #[serde(default)]
    pub fence_us: u64,
    /// From the moment the driver saw the source quiesced until it sent the go-ahead:
    /// the coordinator's share of the downtime (journal writes and the fence).
    #[serde(default)]
    pub handover_ms: u64,
    /// When the source quiesced, ms after the agent started the migration.
    #[serde(default)]
    pub quiesced_at_ms: u64,
    /// The agent's figure: from the source's pause to the go-ahead (the last pages,
    /// state and digest check run meanwhile).
    #[serde(default)]
    pub switchover_wait_ms: u64,
    pub memory_bytes: u64,
    pub memory_total_bytes: u64,
    pub remaining_bytes: u64,
    /// Disk bytes copied: 0 on shared storage (no mirror).
    pub disk_bytes: u64,
    pub passes: u64,
    /// Geographic migration: bytes the mirror still has to copy (dirty), the disks'
    /// size, and the mirror's state as its storage node last reported it.
    #[serde(default)]
    pub disk_dirty_bytes: u64,
    #[serde(default)]
    pub disk_total_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_state: Option<String>,
}

/// One disk a geographic migration moves: the copy made on a storage node of the
/// target site and the mirror job filling it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MovedDisk {
    /// Index in the VM's `disks`.
    pub index: usize,
    /// The target site's copy. Its lease fields (and token) are the target host's once
    /// the fence gave it the disk; before that they stay at the mirror's epoch with no
    /// token (the mirror job holds it).
    pub replica: Disk,
    /// The mirror job's id on the source disk's storage node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
}

/// What a geographic migration adds to its record (stored with it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct DiskMovePlan {
    pub disks: Vec<MovedDisk>,
    /// The mirror was switched to write-blocking.
    #[serde(default)]
    pub write_blocking: bool,
    /// The agent's migration was started with a hold for the disk's sake that has not
    /// been lifted yet.
    #[serde(default)]
    pub disk_hold: bool,
    /// Every mirror job drained and completed (the source was quiesced).
    #[serde(default)]
    pub completed: bool,
    /// The VM's disks before the commit (the source site's copies), kept until they
    /// are deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub old_disks: Vec<Disk>,
    /// The migration ended and the copy it left unused is gone.
    #[serde(default)]
    pub cleaned: bool,
}

/// A migration as stored: the pure state machine's record plus what the shell needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationDoc {
    pub record: MigrationRecord,
    pub to_site: String,
    pub options: MigrationOptions,
    /// The source agent's migration id, once it accepted the migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_migration: Option<String>,
    pub figures: MigrationFigures,
    /// Unix milliseconds.
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Geographic migration: the disks it moves (None on shared storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_move: Option<DiskMovePlan>,
}

/// A VM's continuous replication to another site (`coord replicate`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Replication {
    pub vm: String,
    pub to_site: String,
    pub disks: Vec<ReplicaDisk>,
    /// `starting` (stored before the calls) or `running`.
    pub state: String,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One replicated disk: the VM's export on `storage`, its replica (same export name)
/// on `target`, leased to the mirror job at `epoch`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaDisk {
    pub storage: String,
    pub export: String,
    pub target: String,
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
}

/// One journal entry: a phase as it was made durable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JournalEntry {
    pub at_ms: u64,
    pub phase: crate::migration::Phase,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Valid names for sites, nodes, hosts and VMs: what every daemon accepts in a path.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("vm7"));
        assert!(valid_name("kvm-a1.x_y"));
        assert!(!valid_name(""));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(65)));
    }

    #[test]
    fn disk_tokens_are_stored_but_never_debug_printed() {
        let d = Disk {
            storage: "n".into(),
            export: "e".into(),
            size_bytes: 1,
            epoch: 2,
            holder: "h".into(),
            token: Secret::new("tok-secret-1").ok(),
        };
        assert!(!format!("{d:?}").contains("tok-secret-1"));
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains("\"token\":\"tok-secret-1\""), "{json}");
        let back: Disk = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        let cleared = Disk { token: None, ..d };
        let json = serde_json::to_string(&cleared).unwrap();
        assert_eq!(serde_json::from_str::<Disk>(&json).unwrap().token, None);
    }

    #[test]
    fn storage_reach() {
        let s = StorageNode {
            name: "nbd-a1".into(),
            site: "siteA".into(),
            api: "http://x".into(),
            nbd: "x:1".into(),
            reachable_from: vec!["siteB".into()],
            disk_dir: None,
            token: None,
        };
        assert!(s.reaches("siteA"));
        assert!(s.reaches("siteB"));
        assert!(!s.reaches("siteC"));
    }
}
