//! The `coord` command line: `coord serve` and the client verbs of api.md. Each verb
//! is one call (or a poll loop for `migrate --wait`) to the coordinator's API; output
//! is a table for people or the API's JSON with `--json`.
//!
//! - this file: the verbs and their flags (clap);
//! - `parse`: sizes and numbers on the command line;
//! - `client`: the HTTP(S) client of the coordinator and the CLI's errors;
//! - `output`: tables and the human-readable views;
//! - `run`: what each verb does (`coord certs create` runs locally).

mod client;
mod fleet;
mod output;
mod parse;
mod run;

use clap::{Args, Parser, Subcommand};

pub use client::{CliError, Client};
pub use parse::{parse_bytes, parse_mib};
pub use run::run_client;

use crate::config::ServeFlags;
use parse::parse_u64;

#[derive(Parser)]
#[command(
    name = "coord",
    version,
    about = "Stagehand coordinator: inventory, placement and live migration with disk lease handoff",
    long_about = "Stagehand coordinator.\n\n`coord serve` runs the coordinator daemon. Every other verb is a client of it: \
it talks to --coordinator (default $STAGEHAND_COORDINATOR or http://127.0.0.1:7070) with the token in \
$STAGEHAND_TOKEN, prints tables (or the API's JSON with --json), and exits non-zero with a one-line reason \
on failure.\n\nTypical first steps:\n  coord site add siteA\n  coord storage add nbd-a1 --site siteA --api http://10.0.0.5:7080 --nbd 10.0.0.5:10809 --disk-dir /srv/disks\n  \
coord host add kvm-a1 --site siteA --api http://10.0.0.7:7071 --migration 10.0.0.7:9081 --memory 64G\n  \
coord vm create vm7 --site siteA --memory 256M --image /srv/guests/app.bin --disk 1G\n  coord migrate vm7 --to siteB --wait"
)]
pub struct Cli {
    /// Coordinator URL.
    #[arg(
        long,
        global = true,
        env = "STAGEHAND_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// CA certificate (PEM) to verify an https:// coordinator against.
    #[arg(long, global = true, env = "STAGEHAND_CA", value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the coordinator daemon.
    Serve(Box<ServeFlags>),
    /// Sites (failure domains; hosts and storage nodes belong to one).
    #[command(subcommand)]
    Site(SiteCmd),
    /// Storage nodes (stagehand-nbd).
    #[command(subcommand)]
    Storage(StorageCmd),
    /// KVM hosts (stagehand-agent).
    #[command(subcommand)]
    Host(HostCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Live-migrate a VM to another site or host, handing its disk lease over.
    Migrate(MigrateArgs),
    /// Migrations and their journal.
    #[command(subcommand)]
    Migration(MigrationCmd),
    /// Continuous replication of a VM's disks to another site (background mirror
    /// jobs: `replicate VM --to SITE`, `replicate list`, `replicate stop VM`).
    Replicate(ReplicateArgs),
    /// Even out memory and CPU use across a site's hosts (every site without --site)
    /// with as few migrations as possible; shows the plan and carries it out.
    Balance(fleet::FleetArgs),
    /// Pack a site's guests onto as few hosts as capacity allows; the emptied hosts are
    /// left drained (stand-by) and listed as hosts that can be powered down.
    Consolidate(fleet::FleetArgs),
    /// Fleet operations (evacuate, balance, consolidate) and their per-guest results.
    #[command(subcommand)]
    Fleet(fleet::FleetCmd),
    /// Which coordinator leads and since when, this one's part, and the state store's
    /// kind, health and members.
    Status,
    /// TLS certificates for a cluster (a new CA and one directory per node).
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Print a VM's disk lease tokens (JSON) from the coordinator's state directory.
    /// Needs read access to that directory, which holds them anyway; for tests and
    /// break-glass use. The API never shows tokens.
    #[command(hide = true)]
    LeaseTokens {
        vm: String,
        #[arg(long, value_name = "DIR", required_unless_present = "store")]
        data_dir: Option<std::path::PathBuf>,
        /// Read them from etcd instead (etcd://HOST:PORT,...).
        #[arg(long, value_name = "URI")]
        store: Option<String>,
        #[arg(long, value_name = "FILE")]
        store_ca: Option<std::path::PathBuf>,
        #[arg(long, value_name = "FILE")]
        store_cert: Option<std::path::PathBuf>,
        #[arg(long, value_name = "FILE")]
        store_key: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum CertsCmd {
    /// Create a CA in --out (ca-cert.pem, ca-key.pem) and, for each --node, a
    /// directory --out/NODE with ca-cert.pem, server-cert.pem, server-key.pem,
    /// client-cert.pem and client-key.pem (the layout libnbd's tls-certificates= and
    /// qemu's tls-creds-x509 take). Each node certificate is valid for its name, every
    /// --san, localhost, 127.0.0.1 and ::1, as a server and as a client. Give a daemon
    /// --tls-cert DIR/server-cert.pem --tls-key DIR/server-key.pem --tls-ca DIR/ca-cert.pem.
    Create {
        /// Directory to create the CA and node directories in.
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// A node (daemon) to issue a certificate for; repeat for each.
        #[arg(long = "node", value_name = "NAME", required = true)]
        nodes: Vec<String>,
        /// Another name (host name or IP address) every node certificate is valid for.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum SiteCmd {
    /// Add a site.
    Add { name: String },
    /// List sites.
    List,
}

#[derive(Subcommand)]
pub enum StorageCmd {
    /// Add a storage node (it serves hosts of its site and of --reachable-from).
    Add {
        name: String,
        #[arg(long)]
        site: String,
        /// The node's control API URL, e.g. http://10.0.0.5:7080.
        #[arg(long)]
        api: String,
        /// The node's NBD listener HOST:PORT.
        #[arg(long)]
        nbd: String,
        /// Other sites whose hosts reach this node, comma-separated.
        #[arg(long, value_delimiter = ',')]
        reachable_from: Vec<String>,
        /// Directory on the node where VM disks are created (it must be under one of
        /// the node's --export-root). Default: the node's own export root.
        #[arg(long)]
        disk_dir: Option<String>,
        /// The node's own API token, when it differs from the cluster token.
        #[arg(long)]
        token: Option<String>,
    },
    /// List storage nodes.
    List,
}

#[derive(Subcommand)]
pub enum HostCmd {
    /// Add a KVM host running stagehand-agent.
    Add {
        name: String,
        #[arg(long)]
        site: String,
        /// The agent's API URL, e.g. http://10.0.0.7:7071.
        #[arg(long)]
        api: String,
        /// The agent's migration listener HOST:PORT.
        #[arg(long)]
        migration: String,
        /// Guest memory this host may hold (e.g. 64G, 4096M).
        #[arg(long, default_value = "8G", value_parser = parse_mib)]
        memory: u64,
        /// The agent's own API token, when it differs from the cluster token.
        #[arg(long)]
        token: Option<String>,
    },
    /// List hosts.
    List,
    /// Show a host with its agent's report (capacity, CPU fingerprint, guests' usage).
    Show { name: String },
    /// Mark a host unschedulable (maintenance): no VM is placed or migrated onto it.
    Drain { name: String },
    /// Make a drained (or stand-by) host schedulable again.
    Undrain { name: String },
    /// Drain the host and live-migrate every guest off it (longest migrations first,
    /// within the concurrency limits); reports per guest and names any guest that
    /// cannot move.
    Evacuate {
        name: String,
        /// Answer at once with the operation id (follow with `coord fleet show ID`).
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// Create a VM: place it, create and lease its disk, start it.
    Create(CreateArgs),
    /// List VMs.
    List,
    /// Show one VM, with its disks' lease epochs and its host's live view.
    Show { name: String },
    /// Stop a VM and remove its disk export (the disk file stays on the node).
    Delete { name: String },
    /// Pin a VM to its host: balance and consolidate never move it (evacuate names it
    /// as unable to move).
    Pin { name: String },
    /// Lift a pin.
    Unpin { name: String },
}

#[derive(Args)]
pub struct CreateArgs {
    pub name: String,
    /// Site to place the VM in (a host with room is chosen).
    #[arg(long)]
    pub site: Option<String>,
    /// Place on this host instead.
    #[arg(long)]
    pub host: Option<String>,
    /// Guest memory (e.g. 256M, 1G).
    #[arg(long, value_parser = parse_mib)]
    pub memory: u64,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// The guest's flat binary (a path valid on the hosts).
    #[arg(long)]
    pub image: String,
    /// Guest-physical load address of the image.
    #[arg(long, default_value = "0x7c00", value_parser = parse_u64)]
    pub load_addr: u64,
    /// Disk size (e.g. 1G, 64M).
    #[arg(long, value_parser = parse_bytes)]
    pub disk: u64,
    /// Fill the new disk from this raw image (read by the coordinator).
    #[arg(long)]
    pub disk_image: Option<String>,
}

#[derive(Args)]
pub struct MigrateArgs {
    pub vm: String,
    /// Target site.
    #[arg(long)]
    pub to: Option<String>,
    /// Target host (else the host of the target site with most room).
    #[arg(long)]
    pub host: Option<String>,
    /// Longest pause allowed at switchover, ms.
    #[arg(long)]
    pub downtime_ms: Option<u64>,
    /// Bandwidth cap, MiB/s.
    #[arg(long)]
    pub bandwidth: Option<u64>,
    /// Pause the guest first, then move its memory and device state to the target by a
    /// coordinated migration (one pass: nothing is dirtied) and resume it there where
    /// it stopped. The downtime is the whole move.
    #[arg(long)]
    pub offline: bool,
    /// Hold the switchover: pre-copy keeps the target in step (however little is left)
    /// until `coord migration release ID`; cancel still works. Chooses the moment of
    /// the pause, e.g. a quiet minute of the guest's workload.
    #[arg(long, conflicts_with = "offline")]
    pub hold: bool,
    /// Follow the migration to its end (progress bar on a terminal), then print its figures.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this many seconds (the migration goes on).
    #[arg(long, default_value_t = 3600)]
    pub wait_timeout_s: u64,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ReplicateArgs {
    #[command(subcommand)]
    pub cmd: Option<ReplicateCmd>,
    /// The VM to replicate.
    pub vm: Option<String>,
    /// The site to replicate to (a storage node of that site gets the replica).
    #[arg(long)]
    pub to: Option<String>,
}

#[derive(Subcommand)]
pub enum ReplicateCmd {
    /// List replications: state, lag (bytes still to copy), consistency.
    List,
    /// Stop a VM's replication and delete its replica.
    Stop { vm: String },
}

#[derive(Subcommand)]
pub enum MigrationCmd {
    /// List migrations.
    List,
    /// Show a migration, its figures and its journal.
    Show { id: String },
    /// Cancel a migration (possible until the disk handover starts).
    Cancel { id: String },
    /// Let a migration started with --hold switch over (when the rest fits its
    /// downtime limit).
    Release { id: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_mib("256M"), Ok(256));
        assert_eq!(parse_mib("1G"), Ok(1024));
        assert_eq!(parse_mib("1GiB"), Ok(1024));
        assert_eq!(parse_mib("512"), Ok(512));
        assert!(parse_mib("0").is_err());
        assert!(parse_mib("12Q").is_err());
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("64m"), Ok(64 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_u64("0x7c00"), Ok(0x7c00));
        assert!(parse_bytes("abc").is_err());
    }

    #[test]
    fn offline_help_says_memory_moves() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("migrate")
            .expect("migrate verb")
            .render_long_help()
            .to_string();
        assert!(help.contains("move its memory and device state"), "{help}");
        assert!(!help.contains("no memory is moved"), "{help}");
    }

    #[test]
    fn certs_create_and_ca_parse() {
        let p = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("coord").chain(args.iter().copied()))
        };
        assert!(
            p(&[
                "certs", "create", "--out", "/tmp/x", "--node", "a", "--node", "b", "--san",
                "10.0.0.5"
            ])
            .is_ok()
        );
        assert!(
            p(&["certs", "create", "--out", "/tmp/x"]).is_err(),
            "--node is required"
        );
        let c = p(&["--ca", "/ca.pem", "site", "list"]).unwrap();
        assert_eq!(c.ca.as_deref(), Some(std::path::Path::new("/ca.pem")));
    }

    #[test]
    fn cli_parses_the_documented_verbs() {
        let p = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("coord").chain(args.iter().copied()))
        };
        assert!(p(&["site", "add", "siteB"]).is_ok());
        assert!(
            p(&[
                "storage",
                "add",
                "nbd-b1",
                "--site",
                "siteB",
                "--api",
                "http://x",
                "--nbd",
                "h:1",
                "--reachable-from",
                "siteA,siteB"
            ])
            .is_ok()
        );
        assert!(
            p(&[
                "host",
                "add",
                "kvm-b1",
                "--site",
                "siteB",
                "--api",
                "http://x",
                "--migration",
                "h:2"
            ])
            .is_ok()
        );
        assert!(
            p(&[
                "vm", "create", "vm7", "--site", "siteA", "--memory", "256M", "--image", "/f",
                "--disk", "1G"
            ])
            .is_ok()
        );
        assert!(
            p(&[
                "vm", "create", "vm7", "--site", "siteA", "--image", "/f", "--disk", "1G"
            ])
            .is_err()
        );
        assert!(
            p(&[
                "migrate",
                "vm7",
                "--to",
                "siteB",
                "--downtime-ms",
                "50",
                "--bandwidth",
                "100",
                "--wait"
            ])
            .is_ok()
        );
        assert!(p(&["migration", "cancel", "mig-1", "--json"]).is_ok());
        assert!(p(&["vm", "list"]).is_ok());
    }
}
