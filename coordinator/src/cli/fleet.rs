//! The fleet verbs: `coord balance`, `coord consolidate`, `coord host evacuate` (the
//! following and printing part), `coord fleet list|show`, `coord host show`.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::output::{emit, list_table, s};
use super::{CliError, Client};

#[derive(Args)]
pub struct FleetArgs {
    /// The site to plan for (balance: every site when left out).
    #[arg(long)]
    pub site: Option<String>,
    /// Show the plan (table, or JSON with --json) and move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Balance: stop once hosts are within this fraction of each other in memory and
    /// CPU use (default 0.15).
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Answer at once with the operation id (follow with `coord fleet show ID`).
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Subcommand)]
pub enum FleetCmd {
    /// List fleet operations.
    List,
    /// Show one operation: its plan and each guest's migration.
    Show { id: String },
}

/// Longest the CLI follows an operation.
const WAIT_LIMIT: Duration = Duration::from_secs(3600);

pub async fn plan_verb(c: &Client, j: bool, path: &str, a: FleetArgs) -> Result<(), CliError> {
    let body = json!({"site": a.site, "dry_run": a.dry_run, "threshold": a.threshold});
    let v = c.call(reqwest::Method::POST, path, Some(body)).await?;
    if a.dry_run {
        emit(j, &v, print_plan);
        return Ok(());
    }
    follow(c, j, v, !a.no_wait).await
}

pub async fn fleet_cmd(c: &Client, j: bool, cmd: FleetCmd) -> Result<(), CliError> {
    match cmd {
        FleetCmd::List => {
            let v = c.call(reqwest::Method::GET, "/v1/fleet", None).await?;
            emit(j, &v, |v| {
                list_table(
                    v,
                    &[
                        ("ID", "/id"),
                        ("KIND", "/kind"),
                        ("SITE", "/site"),
                        ("HOST", "/host"),
                        ("STATE", "/state"),
                        ("TOTAL MS", "/total_ms"),
                    ],
                )
            });
        }
        FleetCmd::Show { id } => {
            let v = c
                .call(reqwest::Method::GET, &format!("/v1/fleet/{id}"), None)
                .await?;
            emit(j, &v, print_op);
        }
    }
    Ok(())
}

/// Follows an operation to its end (when `wait`), prints it, and fails with a one-line
/// reason naming the guests that did not move.
pub async fn follow(c: &Client, j: bool, mut v: Value, wait: bool) -> Result<(), CliError> {
    let id = v["id"]
        .as_str()
        .ok_or_else(|| CliError::BadAnswer("no operation id".into()))?
        .to_owned();
    if !wait {
        emit(j, &v, |v| {
            print_plan(&v["plan"]);
            println!("operation {id} started (follow with `coord fleet show {id}`)");
        });
        return Ok(());
    }
    if !j {
        print_plan(&v["plan"]);
    }
    let end = std::time::Instant::now() + WAIT_LIMIT;
    while v["state"] == "running" {
        if std::time::Instant::now() > end {
            return Err(CliError::Local(format!(
                "gave up waiting for {id}; it goes on (see `coord fleet show {id}`)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        v = c
            .call(reqwest::Method::GET, &format!("/v1/fleet/{id}"), None)
            .await?;
    }
    emit(j, &v, print_op);
    if v["state"] != "completed" {
        let bad: Vec<String> = v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["state"] != "committed")
            .map(|i| {
                format!(
                    "{} ({}: {})",
                    s(&i["vm"]),
                    s(&i["state"]),
                    i["error"].as_str().unwrap_or("-")
                )
            })
            .collect();
        return Err(CliError::Local(format!(
            "{id} {}: not moved: {}",
            s(&v["state"]),
            bad.join("; ")
        )));
    }
    Ok(())
}

fn print_plan(p: &Value) {
    let moves = p["moves"].as_array().map(Vec::len).unwrap_or(0);
    println!("plan: {moves} migration(s)");
    if moves > 0 {
        list_table(
            &p["moves"],
            &[
                ("VM", "/vm"),
                ("FROM", "/from"),
                ("TO", "/to"),
                ("MEMORY MIB", "/memory_mib"),
                ("EST S", "/estimate_s"),
            ],
        );
    }
    if p["stuck"].as_array().is_some_and(|a| !a.is_empty()) {
        println!("cannot move:");
        list_table(
            &p["stuck"],
            &[("VM", "/vm"), ("HOST", "/host"), ("REASON", "/reason")],
        );
    }
    println!("hosts after the plan:");
    list_table(
        &p["after"],
        &[
            ("HOST", "/host"),
            ("GUESTS", "/guests"),
            ("MEMORY MIB", "/memory_mib"),
            ("CAPACITY MIB", "/memory_mib_capacity"),
            ("MEM %", "/memory_fraction"),
            ("CPU %", "/cpu_fraction"),
            ("DRAINED", "/drained"),
        ],
    );
    println!(
        "imbalance: {:.3} -> {:.3}",
        p["imbalance_before"].as_f64().unwrap_or(0.0),
        p["imbalance_after"].as_f64().unwrap_or(0.0)
    );
    for (k, label) in [
        (
            "freed_hosts",
            "hosts to empty (stand-by, can be powered down)",
        ),
        ("reactivated_hosts", "stand-by hosts taken back"),
    ] {
        if p[k].as_array().is_some_and(|a| !a.is_empty()) {
            println!("{label}: {}", s(&p[k]));
        }
    }
}

fn print_op(v: &Value) {
    println!(
        "{} {} {}: {} in {} ms",
        s(&v["id"]),
        s(&v["kind"]),
        v["host"].as_str().or(v["site"].as_str()).unwrap_or("-"),
        s(&v["state"]),
        s(&v["total_ms"])
    );
    list_table(
        &v["items"],
        &[
            ("VM", "/vm"),
            ("FROM", "/from"),
            ("TO", "/to"),
            ("STATE", "/state"),
            ("MIGRATION", "/migration"),
            ("TOTAL MS", "/total_ms"),
            ("DOWNTIME MS", "/downtime_ms"),
            ("ERROR", "/error"),
        ],
    );
    if v["freed_hosts"].as_array().is_some_and(|a| !a.is_empty()) {
        println!(
            "hosts that can be powered down (drained, stand-by): {}",
            s(&v["freed_hosts"])
        );
    }
}

pub fn print_host(v: &Value) {
    println!(
        "host {} in {}: {} MiB for guests (--memory {}), drained: {}",
        s(&v["name"]),
        s(&v["site"]),
        s(&v["capacity_mib"]),
        s(&v["memory_mib"]),
        s(&v["drained"])
    );
    let r = &v["report"];
    if r.is_null() {
        println!("no report from the agent yet");
        return;
    }
    println!(
        "agent: {} MiB total, {} MiB for guests, {} MiB used, {} vCPUs, CPU {} (fingerprint {})",
        s(&r["memory_mib_total"]),
        s(&r["memory_mib_for_guests"]),
        s(&r["memory_mib_used"]),
        s(&r["vcpus"]),
        s(&r["cpu"]["model"]),
        r["cpu"]["fingerprint"]
            .as_str()
            .map(|f| f.get(..16).unwrap_or(f))
            .unwrap_or("-")
    );
    list_table(
        &r["guests"],
        &[
            ("GUEST", "/name"),
            ("MEMORY MIB", "/memory_mib"),
            ("CPU %", "/cpu_percent"),
            ("DIRTY MIB/S", "/dirty_mib_per_s"),
        ],
    );
}
