//! What each client verb does.

use std::io::IsTerminal;
use std::time::Duration;

use serde_json::{Value, json};

use super::output::{emit, list_table, print_figures, print_vm, s};
use super::{
    CertsCmd, Cli, CliError, Client, Command, HostCmd, MigrationCmd, ReplicateCmd, SiteCmd,
    StorageCmd, VmCmd,
};

/// Runs one client verb. `serve` is handled by main.
pub async fn run_client(cli: Cli) -> Result<(), CliError> {
    use reqwest::Method as M;
    let token = std::env::var("STAGEHAND_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    if let Command::Certs(CertsCmd::Create { out, nodes, sans }) = &cli.command {
        return certs_create(out, nodes, sans);
    }
    let c = Client::new(&cli.coordinator, token, cli.ca.as_deref())?;
    let j = cli.json;
    match cli.command {
        Command::Serve(_) => unreachable!("main runs serve itself"),
        Command::Certs(_) => unreachable!("handled above"),
        Command::LeaseTokens {
            vm,
            data_dir,
            store,
            store_ca,
            store_cert,
            store_key,
        } => {
            let local = |e: &dyn std::fmt::Display| CliError::Local(e.to_string());
            let cfg =
                crate::config::store_config(store.as_deref(), store_ca, store_cert, store_key)
                    .map_err(|e| local(&e))?;
            let (st, from) = match cfg {
                crate::config::StoreConfig::Etcd(ec) => {
                    let es = crate::store::etcd::EtcdStore::connect(ec).map_err(|e| local(&e))?;
                    (
                        crate::store::Store::from_backend(std::sync::Arc::new(es)),
                        store.unwrap_or_default(),
                    )
                }
                crate::config::StoreConfig::Rocks => {
                    let dir = data_dir.unwrap_or_default();
                    (
                        crate::store::Store::open_read_only(&dir).map_err(|e| local(&e))?,
                        dir.display().to_string(),
                    )
                }
            };
            let rec: crate::model::Vm = st
                .get("vms", &vm)
                .map_err(|e| local(&e))?
                .ok_or_else(|| CliError::Local(format!("no VM named {vm} in {from}")))?;
            let v: Vec<Value> = rec
                .disks
                .iter()
                .map(|d| json!({"export": d.export, "epoch": d.epoch, "holder": d.holder, "token": d.token.as_ref().map(|t| t.expose()).unwrap_or("")}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Command::Status => {
            let v = c.call(M::GET, "/v1/status", None).await?;
            emit(j, &v, super::output::print_status);
        }
        Command::Site(SiteCmd::Add { name }) => {
            let v = c.call(M::PUT, &format!("/v1/sites/{name}"), None).await?;
            emit(j, &v, |v| println!("site {} added", s(&v["name"])));
        }
        Command::Site(SiteCmd::List) => {
            let v = c.call(M::GET, "/v1/sites", None).await?;
            emit(j, &v, |v| list_table(v, &[("SITE", "/name")]));
        }
        Command::Storage(StorageCmd::Add {
            name,
            site,
            api,
            nbd,
            reachable_from,
            disk_dir,
            token,
        }) => {
            let body = json!({"site": site, "api": api, "nbd": nbd, "reachable_from": reachable_from, "disk_dir": disk_dir, "token": token});
            let v = c
                .call(M::PUT, &format!("/v1/storage/{name}"), Some(body))
                .await?;
            emit(j, &v, |v| {
                println!(
                    "storage node {} added in {} (reachable from {})",
                    s(&v["name"]),
                    s(&v["site"]),
                    s(&v["reachable_from"])
                )
            });
        }
        Command::Storage(StorageCmd::List) => {
            let v = c.call(M::GET, "/v1/storage", None).await?;
            emit(j, &v, |v| {
                list_table(
                    v,
                    &[
                        ("STORAGE", "/name"),
                        ("SITE", "/site"),
                        ("REACHABLE FROM", "/reachable_from"),
                        ("NBD", "/nbd"),
                        ("API", "/api"),
                    ],
                )
            });
        }
        Command::Host(HostCmd::Add {
            name,
            site,
            api,
            migration,
            memory,
            token,
        }) => {
            let body = json!({"site": site, "api": api, "migration": migration, "memory_mib": memory, "token": token});
            let v = c
                .call(M::PUT, &format!("/v1/hosts/{name}"), Some(body))
                .await?;
            emit(j, &v, |v| {
                println!(
                    "host {} added in {} ({} MiB for guests)",
                    s(&v["name"]),
                    s(&v["site"]),
                    s(&v["memory_mib"])
                )
            });
        }
        Command::Host(HostCmd::Show { name }) => {
            let v = c.call(M::GET, &format!("/v1/hosts/{name}"), None).await?;
            emit(j, &v, super::fleet::print_host);
        }
        Command::Host(HostCmd::Drain { name }) => {
            let v = c
                .call(M::POST, &format!("/v1/hosts/{name}/drain"), None)
                .await?;
            emit(j, &v, |_| println!("host {name} drained"));
        }
        Command::Host(HostCmd::Undrain { name }) => {
            let v = c
                .call(M::POST, &format!("/v1/hosts/{name}/undrain"), None)
                .await?;
            emit(j, &v, |_| println!("host {name} is schedulable again"));
        }
        Command::Host(HostCmd::Evacuate { name, no_wait }) => {
            let v = c
                .call(M::POST, &format!("/v1/hosts/{name}/evacuate"), None)
                .await?;
            super::fleet::follow(&c, j, v, !no_wait).await?;
        }
        Command::Vm(VmCmd::Pin { name }) => {
            let v = c
                .call(M::POST, &format!("/v1/vms/{name}/pin"), None)
                .await?;
            emit(j, &v, |_| println!("VM {name} pinned"));
        }
        Command::Vm(VmCmd::Unpin { name }) => {
            let v = c
                .call(M::POST, &format!("/v1/vms/{name}/unpin"), None)
                .await?;
            emit(j, &v, |_| println!("VM {name} unpinned"));
        }
        Command::Balance(a) => super::fleet::plan_verb(&c, j, "/v1/balance", a).await?,
        Command::Consolidate(a) => {
            if a.site.is_none() {
                return Err(CliError::Local("consolidate needs --site".into()));
            }
            super::fleet::plan_verb(&c, j, "/v1/consolidate", a).await?
        }
        Command::Fleet(cmd) => super::fleet::fleet_cmd(&c, j, cmd).await?,
        Command::Host(HostCmd::List) => {
            let v = c.call(M::GET, "/v1/hosts", None).await?;
            emit(j, &v, |v| {
                list_table(
                    v,
                    &[
                        ("HOST", "/name"),
                        ("SITE", "/site"),
                        ("MEMORY MIB", "/memory_mib"),
                        ("CAPACITY MIB", "/capacity_mib"),
                        ("DRAINED", "/drained"),
                        ("MIGRATION", "/migration"),
                        ("API", "/api"),
                    ],
                )
            });
        }
        Command::Vm(VmCmd::Create(a)) => {
            let body = json!({
                "site": a.site, "host": a.host, "memory_mib": a.memory, "vcpus": a.vcpus,
                "image": a.image, "load_addr": a.load_addr, "disk_bytes": a.disk, "disk_image": a.disk_image,
            });
            let v = c
                .call(M::PUT, &format!("/v1/vms/{}", a.name), Some(body))
                .await?;
            emit(j, &v, print_vm);
        }
        Command::Vm(VmCmd::List) => {
            let v = c.call(M::GET, "/v1/vms", None).await?;
            emit(j, &v, |v| {
                list_table(
                    v,
                    &[
                        ("VM", "/name"),
                        ("SITE", "/site"),
                        ("HOST", "/host"),
                        ("STATE", "/state"),
                        ("MEMORY MIB", "/memory_mib"),
                        ("DISK EPOCH", "/disks/0/epoch"),
                    ],
                )
            });
        }
        Command::Vm(VmCmd::Show { name }) => {
            let v = c.call(M::GET, &format!("/v1/vms/{name}"), None).await?;
            emit(j, &v, print_vm);
        }
        Command::Vm(VmCmd::Delete { name }) => {
            c.call(M::DELETE, &format!("/v1/vms/{name}"), None).await?;
            emit(j, &json!({"deleted": name}), |_| {
                println!("VM {name} deleted")
            });
        }
        Command::Migrate(a) => {
            let body = json!({
                "vm": a.vm, "to_site": a.to, "to_host": a.host, "downtime_ms": a.downtime_ms,
                "bandwidth_mibs": a.bandwidth, "offline": a.offline, "hold": a.hold,
            });
            let v = c.call(M::POST, "/v1/migrations", Some(body)).await?;
            let id = v["id"]
                .as_str()
                .ok_or_else(|| CliError::BadAnswer("no migration id".into()))?
                .to_owned();
            if !a.wait {
                emit(j, &v, |v| {
                    println!(
                        "migration {id} started: {} -> {} (follow with `coord migration show {id}`)",
                        s(&v["from_host"]),
                        s(&v["to_host"])
                    )
                });
                return Ok(());
            }
            let m = follow(
                &c,
                &id,
                !j && std::io::stderr().is_terminal(),
                Duration::from_secs(a.wait_timeout_s),
            )
            .await?;
            emit(j, &m, print_figures);
            if m["state"] != "committed" {
                return Err(CliError::MigrationFailed {
                    id,
                    phase: s(&m["state"]),
                    reason: s(&m["error"]),
                });
            }
        }
        Command::Replicate(a) => match (a.cmd, a.vm, a.to) {
            (Some(ReplicateCmd::List), _, _) => {
                let v = c.call(M::GET, "/v1/replications", None).await?;
                emit(j, &v, |v| {
                    list_table(
                        v,
                        &[
                            ("VM", "/vm"),
                            ("TO SITE", "/to_site"),
                            ("STATE", "/state"),
                            ("LAG BYTES", "/lag_bytes"),
                            ("COPIED", "/bytes_copied"),
                            ("CONSISTENT", "/consistent"),
                            ("ERROR", "/error"),
                        ],
                    )
                });
            }
            (Some(ReplicateCmd::Stop { vm }), _, _) => {
                let v = c
                    .call(M::DELETE, &format!("/v1/replications/{vm}"), None)
                    .await?;
                emit(j, &v, |_| {
                    println!("replication of {vm} stopped; its replica was deleted")
                });
            }
            (None, Some(vm), Some(to)) => {
                let body = json!({"vm": vm, "to_site": to});
                let v = c.call(M::POST, "/v1/replications", Some(body)).await?;
                emit(j, &v, |v| {
                    println!(
                        "{vm} replicates to {to} ({}); follow with `coord replicate list`",
                        s(&v["state"])
                    )
                });
            }
            _ => {
                return Err(CliError::Local(
                    "give `replicate VM --to SITE`, `replicate list` or `replicate stop VM`".into(),
                ));
            }
        },
        Command::Migration(MigrationCmd::List) => {
            let v = c.call(M::GET, "/v1/migrations", None).await?;
            emit(j, &v, |v| {
                list_table(
                    v,
                    &[
                        ("ID", "/id"),
                        ("VM", "/vm"),
                        ("FROM", "/from_host"),
                        ("TO", "/to_host"),
                        ("STATE", "/state"),
                        ("TOTAL MS", "/total_ms"),
                        ("DOWNTIME MS", "/downtime_ms"),
                        ("DISK COPIED", "/disk_bytes"),
                        ("DISK DIRTY", "/disk_dirty_bytes"),
                    ],
                )
            });
        }
        Command::Migration(MigrationCmd::Show { id }) => {
            let v = c
                .call(M::GET, &format!("/v1/migrations/{id}"), None)
                .await?;
            emit(j, &v, |v| {
                print_figures(v);
                println!("  journal:");
                for e in v["journal"].as_array().into_iter().flatten() {
                    println!("    {}  {}", s(&e["at_ms"]), s(&e["phase"]["phase"]));
                }
            });
        }
        Command::Migration(MigrationCmd::Cancel { id }) => {
            let v = c
                .call(M::POST, &format!("/v1/migrations/{id}/cancel"), None)
                .await?;
            emit(j, &v, |_| {
                println!("cancel of {id} requested; the guest stays on the source")
            });
        }
        Command::Migration(MigrationCmd::Release { id }) => {
            let v = c
                .call(M::POST, &format!("/v1/migrations/{id}/release"), None)
                .await?;
            emit(j, &v, |_| {
                println!(
                    "release of {id} requested; it switches over once the rest fits its downtime limit"
                )
            });
        }
    }
    Ok(())
}

/// `coord certs create`: a new CA and a certificate directory per node.
fn certs_create(out: &std::path::Path, nodes: &[String], sans: &[String]) -> Result<(), CliError> {
    if out.join("ca-key.pem").exists() {
        return Err(CliError::Local(format!(
            "{} already holds a CA (ca-key.pem); choose another --out",
            out.display()
        )));
    }
    let local = |e: stagehand_common::pki::PkiError| CliError::Local(e.to_string());
    let ca = stagehand_common::pki::Ca::create(out).map_err(local)?;
    let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
    for n in nodes {
        let dir = ca.issue(n, &sans).map_err(local)?;
        println!("{n}: {}", dir.display());
    }
    println!("CA: {}", out.join("ca-cert.pem").display());
    Ok(())
}

/// Polls a migration until it reaches a terminal phase; draws a bar when asked.
async fn follow(c: &Client, id: &str, bar: bool, limit: Duration) -> Result<Value, CliError> {
    let pb = bar.then(|| {
        let pb = indicatif::ProgressBar::new(1);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg:<24} [{bar:40}] {bytes}/{total_bytes} ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb
    });
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let m = c
            .call(reqwest::Method::GET, &format!("/v1/migrations/{id}"), None)
            .await?;
        if let Some(pb) = &pb {
            if m["state"] == "mirroring" {
                // The disk first: its bytes until the mirror is synced.
                let total = m["disk_total_bytes"].as_u64().unwrap_or(0).max(1);
                let dirty = m["disk_dirty_bytes"].as_u64().unwrap_or(0).min(total);
                pb.set_length(total);
                pb.set_position(total - dirty);
                pb.set_message(format!("disk {}", s(&m["mirror_state"])));
            } else {
                let total = m["memory_total_bytes"].as_u64().unwrap_or(0).max(1);
                pb.set_length(total);
                pb.set_position(m["memory_bytes"].as_u64().unwrap_or(0).min(total));
                pb.set_message(format!("{} pass {}", s(&m["state"]), s(&m["passes"])));
            }
            pb.tick();
        }
        let done = matches!(
            m["state"].as_str(),
            Some("committed" | "rolled_back" | "cancelled")
        );
        if done {
            if let Some(pb) = &pb {
                pb.finish_and_clear();
            }
            return Ok(m);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::WaitTimeout(id.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
