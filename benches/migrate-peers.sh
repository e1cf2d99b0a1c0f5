#!/usr/bin/env bash
# Live migration side by side: QEMU 7.2 vs stagehand-agent (make bench-migrate).
#
# QEMU is NOT apt-installed (that would replace the qemu-utils 10.0 other tests use):
# Debian's qemu-system-x86 and its qemu-specific packages are downloaded and unpacked
# under ~/.cache/stagehand/qemu; only the plain libraries it links are apt-installed.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${STAGEHAND_BIN_DIR:?set STAGEHAND_BIN_DIR to the directory holding stagehand-agent}"

if [ ! -e /dev/kvm ]; then
  echo "SKIPPED: /dev/kvm missing; the migration benchmark needs KVM" >&2
  exit 0
fi

QEMU_HOME="$HOME/.cache/stagehand/qemu"
export QEMU_ROOT="$QEMU_HOME/root"
if [ ! -x "$QEMU_ROOT/usr/bin/qemu-system-x86_64" ]; then
  mkdir -p "$QEMU_HOME/debs"
  (cd "$QEMU_HOME/debs" && apt-get download qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu)
  for d in "$QEMU_HOME"/debs/*.deb; do dpkg -x "$d" "$QEMU_ROOT"; done
fi
missing=$(ldd "$QEMU_ROOT/usr/bin/qemu-system-x86_64" | awk '/not found/ {print $1}')
if [ -n "$missing" ]; then
  # The plain shared libraries QEMU links (libfdt1, libslirp0, libcapstone4, ...).
  pkgs=(libaio1 libbpf1 libcapstone4 libfdt1 libfuse3-3 libglib2.0-0 libgmp10 libgnutls30 libibverbs1
        libjpeg62-turbo libnuma1 libpixman-1-0 libpmem1 libpng16-16 librdmacm1 libsasl2-2 libseccomp2
        libslirp0 liburing2 libvdeplug2 libzstd1)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
fi

img=$(mktemp --suffix=.bin)
trap 'rm -f "$img"' EXIT
"$STAGEHAND_BIN_DIR/stagehand-agent" guest-image ab-sweeper --out "$img"
python3 benches/migrate-peers.py "$img"
# The coordinator's path on top of the agents': fence share of the downtime, overhead.
python3 benches/migrate-coord.py
