//! Builds the test guests in `guests/` with the system toolchain (GNU `as` and `ld`)
//! into flat binaries that `src/guests.rs` embeds with `include_bytes!`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (source file, load address, required size in bytes or 0 for any)
const GUESTS: &[(&str, u32, usize)] = &[("ab_sweeper", 0x7c00, 512), ("disk_writer", 0x7c00, 0)];

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils: scripts/deps.sh)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for &(name, load_addr, size) in GUESTS {
        let src = Path::new("guests").join(format!("{name}.S"));
        println!("cargo:rerun-if-changed={}", src.display());
        let obj = out.join(format!("{name}.o"));
        let bin = out.join(format!("{name}.bin"));
        run(Command::new("as").arg("--32").arg("-o").arg(&obj).arg(&src));
        run(Command::new("ld")
            .args(["-m", "elf_i386", "--oformat", "binary", "-e", "_start"])
            .arg(format!("-Ttext=0x{load_addr:x}"))
            .arg("-o")
            .arg(&bin)
            .arg(&obj));
        let len = std::fs::metadata(&bin).expect("ld wrote the binary").len() as usize;
        assert!(
            size == 0 || len == size,
            "{name}: {len} bytes, expected {size}"
        );
    }
    println!("cargo:rerun-if-changed=build.rs");
}
