#!/usr/bin/env bash
# Build the dirtying multiboot guest: tools/guest/build.sh [OUT] (default dist/guest/dirty.elf).
# Rebuilds only when a source here is newer than OUT, so tests can call it every run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/dist/guest/dirty.elf}"

if [ -f "$out" ]; then
  stale=0
  for src in "$here/dirty.c" "$here/link.ld" "$here/build.sh"; do
    [ "$src" -nt "$out" ] && stale=1
  done
  [ "$stale" = 0 ] && exit 0
fi

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
# -fno-pic/-no-pie: the image is placed at fixed addresses; no libc, no startup files.
gcc -m32 -march=i686 -ffreestanding -nostdlib -fno-pic -no-pie -fno-stack-protector \
  -fno-asynchronous-unwind-tables -O2 -Wall -Wextra -Werror \
  -static -Wl,--build-id=none -Wl,--no-warn-rwx-segments -Wl,-T,"$here/link.ld" -o "$tmp" "$here/dirty.c"
mv "$tmp" "$out"
