#!/usr/bin/env bash
# Make test/fixtures/v1-pc-16M.snap (before framed clusters) or v1-framed-pc-16M.snap (framed
# clusters, incompatible bit 3): an image in format version 1 (format-spec/container.md) of
# the committed QEMU stream test/fixtures/qemu10-pc-16M.stream, kept so that a test proves images
# of every released format version stay readable (test/unit/image-fixtures.test.ts).
# Not byte-reproducible (the image's uuid and creation time are new each time): run it only to
# add the fixture of a new format version, and never replace a committed one.
# Usage: tools/make-image-fixtures.sh [NAME]   (default v1-framed-pc-16M.snap, what create writes now)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=test/fixtures/${1:-v1-framed-pc-16M.snap}
npm run --silent build
node bin/run.js create "$OUT" --from test/fixtures/qemu10-pc-16M.stream --cluster-size 256K --force
# The page index is a cache beside the image (format-spec/index.md), rebuilt when missing.
rm -rf "$OUT.index"
ls -l "$OUT"
