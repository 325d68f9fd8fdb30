#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for snapctl: QEMU >= 9 (from bookworm-backports when the
# installed one is older), the guest toolchain (gcc with 32-bit support), UEFI firmware (ovmf),
# liblz4's and zlib's headers (native/lz4),
# then `npm ci`, the build and the Linux test guest (tools/linux-guest/build.sh).
# Idempotent: every step checks first. Run as root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
  echo "setup: snapctl needs Node.js >= 20.15 with npm (found: $(node --version 2>/dev/null || echo none)); install it first" >&2
  exit 1
fi
[ "$(id -u)" = 0 ] || SUDO="sudo"

qemu_major() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo 0; return; }
  qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1
}

need_pkgs=()
[ "$(qemu_major)" -ge 9 ] || need_qemu=1
command -v qemu-img >/dev/null 2>&1 || need_qemu=1   # qcow2 disks for the compatibility matrix
command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)
command -v g++ >/dev/null 2>&1 || need_pkgs+=(g++)          # node-gyp links native/lz4 with the C++ driver
command -v make >/dev/null 2>&1 || need_pkgs+=(make)        # node-gyp's build
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)  # node-gyp's gyp
[ -e /usr/include/x86_64-linux-gnu/gnu/stubs-32.h ] || [ -e /usr/lib32/crt1.o ] || need_pkgs+=(gcc-multilib)
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || need_pkgs+=(ovmf)   # UEFI firmware for the compatibility matrix
command -v fincore >/dev/null 2>&1 || need_pkgs+=(util-linux-extra)   # page-cache residency for --bypass-cache (test and bench)
[ -e /usr/include/lz4.h ] || need_pkgs+=(liblz4-dev)   # native/lz4, the LZ4 addon that decodes into snapctl's own buffers (built by npm run build: tools/build-native.sh)
[ -e /usr/include/zlib.h ] || need_pkgs+=(zlib1g-dev)   # native/lz4's crc32 falls back to zlib's on CPUs without PCLMULQDQ

if [ "${need_qemu:-0}" = 1 ] || [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "setup: installing system packages" >&2
  if [ "${need_qemu:-0}" = 1 ] && . /etc/os-release && [ "${VERSION_CODENAME:-}" = bookworm ]; then
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
      mirror=$(grep -rhs '^URIs:' /etc/apt/sources.list.d/debian.sources | head -1 | awk '{print $2}')
      [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | head -1 | awk '{print $2}')
      [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
      echo "deb $mirror bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
    fi
  fi
  $SUDO apt-get update -qq
  export DEBIAN_FRONTEND=noninteractive
  if [ "${need_qemu:-0}" = 1 ]; then
    if grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
      $SUDO apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
    else
      $SUDO apt-get install -y -qq qemu-system-x86 qemu-utils >/dev/null
    fi
  fi
  [ ${#need_pkgs[@]} -eq 0 ] || $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
[ "$(qemu_major)" -ge 9 ] || { echo "setup: QEMU >= 9 is required, found $(qemu-system-x86_64 --version 2>/dev/null | head -1)" >&2; exit 1; }
echo "setup: $(qemu-system-x86_64 --version | head -1)" >&2
bash tools/rgw/rgw.sh install >&2   # Ceph's RADOS Gateway (ceph-mon, ceph-osd, radosgw): the S3 server of the object-storage tests

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund >&2
fi
npm run --silent build >&2   # also builds native/lz4 (tools/build-native.sh)
bash tools/linux-guest/build.sh >&2   # the Linux test guest: kernel .deb via apt, busybox initramfs (dist/linux-guest)
echo "setup: done" >&2
