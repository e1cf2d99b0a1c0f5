//! Sizes and numbers on the command line.

fn split_unit(s: &str) -> Result<(f64, char), String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], s[i..].to_ascii_uppercase()),
        None => (s, String::new()),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 256M or 1G"))?;
    let unit = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 'B',
        "K" => 'K',
        "M" => 'M',
        "G" => 'G',
        "T" => 'T',
        _ => return Err(format!("{s:?} has an unknown unit (use K, M, G, T)")),
    };
    Ok((n, unit))
}

/// Sizes like `1G`, `512M`, `4096` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (n, unit) = split_unit(s)?;
    let mul = match unit {
        'K' => 1u64 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        'T' => 1 << 40,
        _ => 1,
    };
    Ok((n * mul as f64) as u64)
}

/// Memory sizes in MiB: `256M`, `1G`; a bare number is MiB.
pub fn parse_mib(s: &str) -> Result<u64, String> {
    let (n, unit) = split_unit(s)?;
    let mib = match unit {
        'B' | 'M' => n,
        'K' => n / 1024.0,
        'G' => n * 1024.0,
        _ => n * 1024.0 * 1024.0,
    };
    if mib < 1.0 {
        return Err(format!("{s:?} is less than 1 MiB"));
    }
    Ok(mib as u64)
}

pub(super) fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a number"))
}
