#!/usr/bin/env bash
# Installs the system packages Stagehand's build, tests and benchmarks need, when absent.
# Runs apt-get as root; otherwise prints the exact command to run and fails.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have nbdinfo   || need+=(libnbd-bin)
have fio       || need+=(fio)
have nbdkit    || need+=(nbdkit)
have qemu-img  || need+=(qemu-utils)
have clang     || need+=(clang)
have as        || need+=(binutils)   # agent/build.rs assembles the test guests
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
# Debian's RocksDB: scripts/cargo.sh links it instead of building the bundled copy (~22 min).
[ -e /usr/include/rocksdb/c.h ] || need+=(librocksdb-dev)
# The system python: a pyenv or venv python3 on PATH does not see Debian's modules.
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need+=(python3-libnbd)
have curl      || need+=(curl)
have jq        || need+=(jq)        # scripts/demo.sh reads coord --json output
have systemd-analyze || need+=(systemd)  # make test verifies the units in deploy/systemd
have openssl   || need+=(openssl)   # check-units.sh makes certificates the way deploy/README.md does
have tc        || need+=(iproute2)  # bench-migrate shapes a 110 MiB/s link with tc in a netns
have etcd      || need+=(etcd-server)       # coord --store etcd:// and its tests
have protoc    || need+=(protobuf-compiler) # etcd-client compiles the etcd protos,
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev) # which import the well-known types
# The Linux kernel's NBD client (tests/tests/nbd_kernel.rs; skipped without the nbd module).
PATH="$PATH:/usr/sbin:/sbin" have nbd-client || need+=(nbd-client)

if [ ${#need[@]} -eq 0 ]; then
  echo "deps: all system packages present"
  exit 0
fi

echo "deps: installing ${need[*]}"
if [ "$(id -u)" -eq 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
elif have sudo && sudo -n true 2>/dev/null; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
else
  echo "deps: missing packages; run as root:" >&2
  echo "  apt-get update && apt-get install -y ${need[*]}" >&2
  exit 1
fi
