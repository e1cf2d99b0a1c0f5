#!/usr/bin/env bash
# Runs cargo with the system's RocksDB when Debian's librocksdb-dev is installed
# (`make deps` installs it): librocksdb-sys then links it instead of compiling its
# bundled C++ copy, which takes ~22 of the ~30 minutes of a cold build on 2 cores.
# Every Makefile target goes through here so that the choice is the same for all of
# them (switching it rebuilds librocksdb-sys). ROCKSDB_LIB_DIR set by the caller wins;
# STAGEHAND_BUNDLED_ROCKSDB=1 forces the bundled build.
set -euo pipefail
if [ -z "${ROCKSDB_LIB_DIR:-}" ] && [ -z "${STAGEHAND_BUNDLED_ROCKSDB:-}" ]; then
  for d in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib; do
    if [ -e "$d/librocksdb.so" ] && [ -e /usr/include/rocksdb/c.h ]; then
      export ROCKSDB_LIB_DIR="$d"
      break
    fi
  done
fi
exec cargo "$@"
