//! Writes a throwaway CA and node certificates (stagehand_common::pki, the layout
//! libnbd's `tls-certificates=DIR`, nbdkit's `--tls-certificates=DIR` and qemu's
//! `tls-creds-x509,dir=DIR` read) for the TLS rows of benches/nbd-peers.sh.
//!
//! usage: test-pki DIR NODE...

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let Some(dir) = args.next() else {
        bail!("usage: test-pki DIR NODE...");
    };
    let nodes: Vec<String> = args
        .map(|a| {
            a.into_string()
                .map_err(|_| anyhow::anyhow!("node names are UTF-8"))
        })
        .collect::<Result<_, _>>()?;
    let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
    stagehand_common::pki::TestPki::generate(std::path::Path::new(&dir), &names)
        .context("generating the test PKI")?;
    Ok(())
}
