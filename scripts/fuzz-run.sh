#!/usr/bin/env bash
# Runs every fuzz target (fuzz/) for FUZZ_SECONDS each (default 60), coverage-guided,
# on the stable toolchain: the same SanitizerCoverage flags cargo-fuzz passes, without
# AddressSanitizer (that needs nightly; the parsers are safe Rust, so a panic or an
# overflow check is what a crash looks like here). Corpora persist in
# $FUZZ_DIR/corpus (default ~/.cache/stagehand/fuzz), so later runs start where the
# last one stopped. Exits non-zero on the first crash, with the crashing input saved
# next to its corpus.
#
#   FUZZ_SECONDS=300 make fuzz
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH="${FUZZ_SECONDS:-60}"
DIR="${FUZZ_DIR:-$HOME/.cache/stagehand/fuzz}"
TARGET="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="$DIR/target"
# --target keeps these flags off build scripts (a build script with sancov cannot link).
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
  bash scripts/cargo.sh build --release --target "$TARGET" -p stagehand-fuzz --bins
for bin in fuzz/fuzz_targets/*.rs; do
  t="$(basename "$bin" .rs)"
  mkdir -p "$DIR/corpus/$t" "$DIR/crashes/$t"
  echo "fuzz: $t for ${SECONDS_EACH}s"
  "$CARGO_TARGET_DIR/$TARGET/release/$t" -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 \
    -artifact_prefix="$DIR/crashes/$t/" -print_final_stats=1 "$DIR/corpus/$t" 2>&1 \
    | grep -E "^#[0-9]+ +DONE|stat::number_of_executed_units|==[0-9]+==|panicked|SUMMARY" || true
  if [ -n "$(ls -A "$DIR/crashes/$t")" ]; then
    echo "fuzz: $t crashed; inputs in $DIR/crashes/$t" >&2
    exit 1
  fi
done
echo "fuzz: no crashes"
