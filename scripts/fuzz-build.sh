#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/) so they cannot rot. Running them needs cargo-fuzz and
# a nightly toolchain (`cargo fuzz run <target>`); building them works on stable.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f fuzz/Cargo.toml ]; then
  echo "fuzz-build: no fuzz/ crate yet"
  exit 0
fi
cargo build --release --manifest-path fuzz/Cargo.toml --bins
echo "fuzz-build: fuzz targets built"
