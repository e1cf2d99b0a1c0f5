#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/) so they cannot rot; `make fuzz` (scripts/fuzz-run.sh)
# runs them coverage-guided on the stable toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f fuzz/Cargo.toml ]; then
  echo "fuzz-build: no fuzz/ crate yet"
  exit 0
fi
# The whole workspace (fuzz is a member): a `-p` build would resolve other features and
# recompile shared dependencies; after `make test`'s own build this is a no-op.
bash scripts/cargo.sh build --release --workspace --bins
echo "fuzz-build: fuzz targets built"
