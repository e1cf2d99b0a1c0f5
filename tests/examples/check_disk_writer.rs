//! `check_disk_writer`: checks a running disk-writer guest the way the end-to-end tests
//! do, for the demo. Pauses the VM on its agent, dumps its RAM, reads the first MiB
//! of its disk through NBD (nothing is written), runs `agent::guests`'
//! `check_disk_records` and `check_ab_ram`, and resumes the VM.
//!
//! ```text
//! check_disk_writer AGENT_URL VM NBD_HOST:PORT EXPORT DUMP_DIR
//! ```
//!
//! The API token comes from `STAGEHAND_TOKEN`. Disks the coordinator creates need the
//! current lease for reads too: give its token in `STAGEHAND_LEASE_TOKEN` (e.g. from
//! `coord lease-tokens VM --data-dir DIR`); without it the export is opened by its
//! plain name.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

async fn post(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> Result<Value> {
    let mut req = http.post(url).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("POST {url} answered {status}: {v}");
    }
    Ok(v)
}

async fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [agent, vm, nbd, export, dump_dir] = args.as_slice() else {
        bail!("usage: check_disk_writer AGENT_URL VM NBD_HOST:PORT EXPORT DUMP_DIR");
    };
    let token = std::env::var("STAGEHAND_TOKEN").unwrap_or_default();
    // STAGEHAND_TLS_DIR: a node certificate directory (ca-cert.pem, client-cert.pem,
    // client-key.pem): the agent's API is then HTTPS and the storage node wants TLS.
    let tls = match std::env::var_os("STAGEHAND_TLS_DIR") {
        Some(d) => Some(
            stagehand_common::pki::node_files(std::path::Path::new(&d))
                .client_config()
                .context("TLS files in STAGEHAND_TLS_DIR")?,
        ),
        None => None,
    };
    let http = match &tls {
        Some(c) => reqwest::Client::builder()
            .use_preconfigured_tls(rustls::ClientConfig::clone(c))
            .build()?,
        None => reqwest::Client::new(),
    };
    let base = agent.trim_end_matches('/');
    post(&http, &format!("{base}/v1/vms/{vm}/pause"), &token, None).await?;
    let checked = async {
        let dump = std::path::Path::new(dump_dir).join(format!("{vm}.ram"));
        post(
            &http,
            &format!("{base}/v1/vms/{vm}/memory-dump"),
            &token,
            Some(json!({ "path": dump })),
        )
        .await?;
        let ram = std::fs::read(&dump).with_context(|| format!("reading {}", dump.display()))?;
        let _ = std::fs::remove_file(&dump);
        let at = agent::guests::DISK_WRITER_ACKED_ADDR as usize;
        let word: [u8; 8] = ram
            .get(at..at + 8)
            .and_then(|w| w.try_into().ok())
            .context("the RAM dump is too short")?;
        let acked = u64::from_le_bytes(word);
        // The lease travels in the export name on the wire only (nbd-client builds it).
        let mut opts = nbd_client::ClientOptions::new(export);
        if let Ok(t) = std::env::var("STAGEHAND_LEASE_TOKEN")
            && !t.is_empty()
        {
            opts = opts.lease(&stagehand_common::secret::Secret::new(t)?);
        }
        if let Some(c) = &tls {
            opts = opts.tls(c.clone(), stagehand_common::tls::server_name(nbd)?);
        }
        let c = nbd_client::Client::connect_tcp(nbd, opts)
            .await
            .context("connecting to the storage node")?;
        let len = c.size().min(1 << 20) as u32;
        let disk = c.read(0, len).await.context("reading the disk")?;
        let _ = c.disconnect().await;
        let check = agent::guests::check_disk_records(&disk, acked)
            .map_err(|e| anyhow::anyhow!("disk check failed: {e}"))?;
        agent::guests::check_ab_ram(&ram).map_err(|e| anyhow::anyhow!("RAM check failed: {e}"))?;
        Ok::<_, anyhow::Error>((acked, check))
    }
    .await;
    // Resume whatever the check said: the demo goes on with a running guest.
    post(&http, &format!("{base}/v1/vms/{vm}/resume"), &token, None).await?;
    let (acked, check) = checked?;
    println!(
        "disk check: ok - {} records acknowledged, {} of {} sectors written, newest record {}, RAM A-B check ok",
        acked, check.written, check.sectors, check.newest
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("check_disk_writer: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("check_disk_writer: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
