#!/usr/bin/env bash
# Build the Linux test guest: tools/linux-guest/build.sh [OUTDIR] (default dist/linux-guest).
#   OUTDIR/vmlinuz             Debian's cloud kernel: the concrete package that
#                              linux-image-cloud-amd64 depends on, fetched with `apt-get download`
#                              and unpacked with `dpkg-deb -x` (never installed)
#   OUTDIR/initramfs.cpio.gz   busybox (static), /init (init here), memwork (memwork.c, static)
#                              and the kernel's virtio driver modules with their dependencies
# Installs what it needs when missing (busybox-static, cpio, gcc, libc6-dev). Quick when already
# built: OUTDIR/stamp holds a hash of the sources here, and a matching stamp means nothing to do.
# Nothing it makes is committed (dist/ is ignored).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/dist/linux-guest}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# Drivers for the devices tests attach. Any missing from the kernel (the cloud kernel has no e1000)
# or built in is skipped with a note; the virtio ones must be there.
REQUIRED_MODULES="virtio_pci virtio_net virtio_blk virtio_scsi virtio_console virtio_balloon virtio_rng"
OPTIONAL_MODULES="e1000 e1000e"

# $LINUX_GUEST_KERNEL_PACKAGE picks another kernel package (e.g. a backports one) by its full name.
src_hash=$( (cat "$here/build.sh" "$here/init" "$here/memwork.c"; echo "${LINUX_GUEST_KERNEL_PACKAGE:-}") | sha256sum | cut -c1-16)
exec 9>"$out/.lock"
flock 9
if [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ] && grep -qs "^src=$src_hash\$" "$out/stamp"; then
  exit 0
fi

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_update() {
  [ "$apt_updated" = 1 ] && return
  $SUDO apt-get update -qq
  apt_updated=1
}
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
need=()
for p in busybox-static cpio gcc libc6-dev; do installed "$p" || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "linux-guest: installing ${need[*]}" >&2
  if ! apt-cache show "${need[@]}" >/dev/null 2>&1; then apt_update; fi
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

kernel_package() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/^ *Depends: linux-image-[0-9]/ && !found { print $2; found = 1 }'
}
kpkg=${LINUX_GUEST_KERNEL_PACKAGE:-$(kernel_package)}
if [ -z "$kpkg" ]; then
  apt_update
  kpkg=$(kernel_package)
fi
[ -n "$kpkg" ] || { echo "linux-guest: apt-cache cannot resolve linux-image-cloud-amd64 to a kernel package" >&2; exit 1; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/linux-guest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# As root, apt-get download hands the download to the user _apt, which must be able to write there.
chmod 755 "$tmp"
mkdir "$tmp/deb"
[ "$(id -u)" != 0 ] || chown _apt "$tmp/deb" 2>/dev/null || true
echo "linux-guest: fetching $kpkg" >&2
if ! (cd "$tmp/deb" && apt-get download -q "$kpkg" >/dev/null) && [ "$apt_updated" = 0 ]; then
  # Stale package lists name a kernel the mirror no longer has (security updates replace it).
  apt_update
  kpkg=${LINUX_GUEST_KERNEL_PACKAGE:-$(kernel_package)}
  echo "linux-guest: fetching $kpkg" >&2
  (cd "$tmp/deb" && apt-get download -q "$kpkg" >/dev/null)
fi
deb=$(ls "$tmp"/deb/*.deb)
dpkg-deb -x "$deb" "$tmp/pkg"
kver=$(ls "$tmp/pkg/lib/modules")
moddir="$tmp/pkg/lib/modules/$kver"

# busybox insmod may not read compressed modules, and depmod needs to read them all.
if [ -n "$(find "$moddir" \( -name '*.ko.xz' -o -name '*.ko.zst' \) -print -quit)" ]; then
  command -v xz >/dev/null || { apt_update; $SUDO apt-get install -y -qq xz-utils >/dev/null; }
  command -v zstd >/dev/null || { apt_update; $SUDO apt-get install -y -qq zstd >/dev/null; }
  find "$moddir" -name '*.ko.xz' -print0 | xargs -0 -r -P2 -n64 xz -d
  find "$moddir" -name '*.ko.zst' -print0 | xargs -0 -r -P2 -n64 zstd -q -d --rm
fi
# Debian's packages carry no modules.dep (the postinst runs depmod); make one the way it would.
[ -f "$moddir/modules.dep" ] || busybox depmod -b "$tmp/pkg" "$kver"

rootfs="$tmp/rootfs"
mkdir -p "$rootfs"/{bin,dev,proc,sys,data,etc,tmp,lib/modules/"$kver"}
# $1 = module name; prints its path relative to $moddir and those of its dependencies.
module_closure() {
  local file
  file=$(awk -F: -v n="$1" '{ f = $1; sub(/.*\//, "", f); sub(/\.ko$/, "", f); gsub(/-/, "_", f) } f == n { print $0; exit }' "$moddir/modules.dep")
  [ -n "$file" ] || return 1
  echo "$file" | tr -d ':' | tr ' ' '\n' | grep .
}
loaded=()
for m in $REQUIRED_MODULES $OPTIONAL_MODULES; do
  if paths=$(module_closure "$m"); then
    for p in $paths; do
      mkdir -p "$rootfs/lib/modules/$kver/$(dirname "$p")"
      cp "$moddir/$p" "$rootfs/lib/modules/$kver/$p"
    done
    loaded+=("$m")
  elif grep -qE "/${m//_/[-_]}\.ko" "$moddir/modules.builtin"; then
    echo "linux-guest: $m is built into $kver" >&2
  elif [[ " $REQUIRED_MODULES " == *" $m "* ]]; then
    echo "linux-guest: $kver has no module $m" >&2
    exit 1
  else
    echo "linux-guest: $kver has no $m (skipped)" >&2
  fi
done
cp "$moddir/modules.builtin" "$moddir/modules.order" "$rootfs/lib/modules/$kver/"
busybox depmod -b "$rootfs" "$kver"
printf '%s\n' "${loaded[@]}" >"$rootfs/etc/modules"

# busybox from busybox-static: the one package file that is a static binary.
bb=$(dpkg -L busybox-static | awk '/\/bin\/busybox$/ && !found { print; found = 1 }')
cp "$bb" "$rootfs/bin/busybox"
for applet in sh mount umount mkdir cat cut ls ln readlink basename ip modprobe insmod lsmod depmod \
  poweroff reboot sleep dmesg grep sed tr uname free ps; do
  ln -s busybox "$rootfs/bin/$applet"
done
install -m 0755 "$here/init" "$rootfs/init"
gcc -O2 -static -Wall -Wextra -Werror -o "$rootfs/bin/memwork" "$here/memwork.c"
# The kernel opens /dev/console for init before any devtmpfs: give it a node when we can make one.
mknod -m 600 "$rootfs/dev/console" c 5 1 2>/dev/null || true

(cd "$rootfs" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) | gzip -6 >"$tmp/initramfs.cpio.gz"
cp "$tmp/pkg/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$tmp/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
printf 'src=%s\nkernel=%s\nmodules=%s\n' "$src_hash" "$kpkg" "${loaded[*]}" >"$out/stamp.tmp"
mv "$out/stamp.tmp" "$out/stamp"
echo "linux-guest: built $out (kernel $kver, modules: ${loaded[*]})" >&2
