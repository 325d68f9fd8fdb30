#!/usr/bin/env bash
# Make test/fixtures/v1-pc-16M.snap (before framed clusters) or v1-framed-pc-16M.snap (framed
# clusters, incompatible bit 3): an image in format version 1 (format-spec/container.md) of
# the committed QEMU stream test/fixtures/qemu10-pc-16M.stream, kept so that a test proves images
# of every released format version stay readable (test/unit/image-fixtures.test.ts).
# Not byte-reproducible (the image's uuid and creation time are new each time): run it only to
# add the fixture of a new format version, and never replace a committed one.
# v1-shared-pc-16M.snap (shared slots, incompatible bit 4) is made from a stream of its own, which
# QEMU writes for a 16 MiB pc machine whose RAM starts with 1 MiB of one text line repeated (15
# page contents, each at many offsets) and is zero after it.
# Usage: tools/make-image-fixtures.sh [NAME]   (default v1-framed-pc-16M.snap)
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=${1:-v1-framed-pc-16M.snap}
OUT=test/fixtures/$NAME
npm run --silent build
STREAM=test/fixtures/qemu10-pc-16M.stream
if [ "$NAME" = v1-shared-pc-16M.snap ]; then
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  (yes 'snapctl shared slots fixture ' || true) | head -c 1M > "$TMP/ram"   # yes ends on SIGPIPE
  truncate -s 16M "$TMP/ram"
  tools/make-stream-fixtures.sh qemu-system-x86_64 "$TMP/stream" "$TMP/ram"
  STREAM=$TMP/stream
fi
node bin/run.js create "$OUT" --from "$STREAM" --cluster-size 256K --force $([ "$NAME" = v1-shared-pc-16M.snap ] && echo --dedupe)
# The page index is a cache beside the image (format-spec/index.md), rebuilt when missing.
rm -rf "$OUT.index"
ls -l "$OUT"
