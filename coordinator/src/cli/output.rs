//! Tables and the human-readable views of the API's JSON.

use serde_json::Value;

pub(super) fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Prints a JSON array of records as a table: each column is a header and the JSON
/// pointer of its field in a record (a missing field prints as "-").
pub(super) fn list_table(v: &Value, cols: &[(&str, &str)]) {
    let headers: Vec<&str> = cols.iter().map(|(h, _)| *h).collect();
    let rows = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            cols.iter()
                .map(|(_, ptr)| s(x.pointer(ptr).unwrap_or(&Value::Null)))
                .collect()
        })
        .collect();
    table(&headers, rows);
}

/// Prints rows as aligned columns.
fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

pub(super) fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

pub(super) fn print_vm(v: &Value) {
    println!("name:        {}", s(&v["name"]));
    println!("site/host:   {} / {}", s(&v["site"]), s(&v["host"]));
    println!(
        "state:       {} (host reports: {})",
        s(&v["state"]),
        s(&v["agent_state"])
    );
    println!(
        "memory:      {} MiB, {} vCPU",
        s(&v["memory_mib"]),
        s(&v["vcpus"])
    );
    println!(
        "image:       {} at {:#x}",
        s(&v["image"]),
        v["load_addr"].as_u64().unwrap_or(0)
    );
    if let Some(m) = v["migration"].as_str() {
        println!("migration:   {m}");
    }
    for d in v["disks"].as_array().into_iter().flatten() {
        println!(
            "disk:        {}/{} {} epoch {} held by {}",
            s(&d["storage"]),
            s(&d["export"]),
            human_bytes(d["size_bytes"].as_u64().unwrap_or(0)),
            s(&d["epoch"]),
            s(&d["holder"])
        );
    }
}

pub(super) fn print_figures(m: &Value) {
    println!(
        "migration {} of {}: {} -> {}: {}",
        s(&m["id"]),
        s(&m["vm"]),
        s(&m["from_host"]),
        s(&m["to_host"]),
        s(&m["state"])
    );
    println!("  total:     {} ms", s(&m["total_ms"]));
    println!(
        "  downtime:  {} ms (guest paused: last pages, fence, go-ahead, resume)",
        s(&m["downtime_ms"])
    );
    let down_ms = m["downtime_ms"].as_u64().unwrap_or(0);
    let fence_us = m["fence_us"].as_u64().unwrap_or(0);
    let share = if down_ms > 0 {
        format!(
            ", {:.1}% of the downtime",
            fence_us as f64 / 10.0 / down_ms as f64
        )
    } else {
        String::new()
    };
    println!(
        "  fence:     {:.2} ms (disk lease handoff while the guest is paused{share})",
        fence_us as f64 / 1000.0
    );
    println!(
        "  handover:  {} ms (coordinator: quiesced seen -> go-ahead sent); agent: paused -> go-ahead {} ms",
        s(&m["handover_ms"]),
        s(&m["switchover_wait_ms"])
    );
    println!(
        "  memory:    {} in {} passes",
        human_bytes(m["memory_bytes"].as_u64().unwrap_or(0)),
        s(&m["passes"])
    );
    match m["disk_move"]["disks"].as_array() {
        Some(disks) => println!(
            "  disk:      {} copied, {} dirty, {} in all, to {} (mirror {})",
            human_bytes(m["disk_bytes"].as_u64().unwrap_or(0)),
            human_bytes(m["disk_dirty_bytes"].as_u64().unwrap_or(0)),
            human_bytes(m["disk_total_bytes"].as_u64().unwrap_or(0)),
            disks
                .iter()
                .map(|d| format!("{}/{}", s(&d["storage"]), s(&d["export"])))
                .collect::<Vec<_>>()
                .join(", "),
            s(&m["mirror_state"])
        ),
        None => println!(
            "  disk:      {} (shared storage: nothing copied)",
            human_bytes(m["disk_bytes"].as_u64().unwrap_or(0))
        ),
    }
    if let Some(e) = m["error"].as_str() {
        println!("  error:     {e}");
    }
}

pub(super) fn emit(json_out: bool, v: &Value, human: impl FnOnce(&Value)) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        human(v);
    }
}

/// `coord status` for people.
pub fn print_status(v: &Value) {
    println!(
        "coordinator {} ({})",
        s(&v["coordinator"]["id"]),
        s(&v["coordinator"]["role"])
    );
    match v["leader"].as_object() {
        Some(l) => {
            let since = l.get("since_ms").and_then(Value::as_u64).unwrap_or(0);
            let ago = crate::model::now_ms().saturating_sub(since) / 1000;
            println!(
                "leader      {} at {} (for {ago} s)",
                l.get("id").map(s).unwrap_or_default(),
                l.get("url").map(s).unwrap_or_default()
            );
        }
        None => println!("leader      none (writes are refused until one is elected)"),
    }
    let st = &v["store"];
    let health = if st["healthy"].as_bool() == Some(true) {
        "healthy".to_owned()
    } else {
        format!("UNHEALTHY: {}", s(&st["error"]))
    };
    println!("store       {} ({health})", s(&st["kind"]));
    for m in st["members"].as_array().into_iter().flatten() {
        let urls: Vec<String> = m["urls"].as_array().into_iter().flatten().map(s).collect();
        let up = if m["healthy"].as_bool() == Some(true) {
            "up"
        } else {
            "DOWN"
        };
        println!(
            "  member    {:<12} {:<5} {}",
            s(&m["name"]),
            up,
            urls.join(",")
        );
    }
}
