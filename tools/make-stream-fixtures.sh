#!/usr/bin/env bash
# Regenerate test/fixtures/qemu10-pc-16M.stream: the migration stream QEMU 10 writes for a stopped
# (-S, never started) pc machine with 16 MiB of RAM, saved with `migrate file:`.
# Usage: tools/make-stream-fixtures.sh [QEMU_BINARY [OUT [RAM_FILE]]]
# With RAM_FILE (16 MiB), guest RAM is that file (memory-backend-file, block "mem"), as filled by
# the caller (tools/make-image-fixtures.sh uses it for the shared-slots fixture).
set -euo pipefail
cd "$(dirname "$0")/.."

QEMU=${1:-qemu-system-x86_64}
OUT=${2:-test/fixtures/qemu10-pc-16M.stream}
RAM_FILE=${3:-}
MEM=(-machine pc -m 16M)
if [ -n "$RAM_FILE" ]; then
  MEM=(-object "memory-backend-file,id=mem,size=16M,mem-path=$RAM_FILE,share=on" -machine pc,memory-backend=mem -m 16M)
fi
TMP=$(mktemp -d)
trap 'kill "$QPID" 2>/dev/null || true; rm -rf "$TMP"' EXIT
SOCK=$TMP/qmp.sock

"$QEMU" "${MEM[@]}" -accel tcg -nodefaults -display none -S \
  -qmp "unix:$SOCK,server=on,wait=off" &
QPID=$!

# The QMP conversation: capabilities, migrate to a file, poll until it completes.
node --input-type=module - "$SOCK" "$TMP/out.stream" <<'EOF'
import { createConnection } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
const [sock, out] = process.argv.slice(2)
for (let i = 0; ; i++) {
  try {
    await new Promise((res, rej) => { const s = createConnection(sock, () => { s.destroy(); res() }); s.on('error', rej) })
    break
  } catch (e) { if (i > 100) throw e; await sleep(50) }
}
const s = createConnection(sock)
let buf = ''
const waiting = []
s.on('data', (d) => {
  buf += d
  let nl
  while ((nl = buf.indexOf('\n')) >= 0) {
    const msg = JSON.parse(buf.slice(0, nl)); buf = buf.slice(nl + 1)
    if ('return' in msg || 'error' in msg) waiting.shift()(msg)
  }
})
const cmd = (execute, args) => new Promise((res) => { waiting.push(res); s.write(JSON.stringify({ execute, arguments: args }) + '\n') })
await new Promise((res) => s.once('data', res)) // greeting
const check = (r) => { if (r.error) throw new Error(JSON.stringify(r.error)); return r.return }
check(await cmd('qmp_capabilities'))
check(await cmd('migrate', { uri: `file:${out}` }))
for (;;) {
  const st = check(await cmd('query-migrate'))
  if (st.status === 'completed') break
  if (st.status === 'failed') throw new Error(`migration failed: ${st['error-desc']}`)
  await sleep(50)
}
check(await cmd('quit'))
s.destroy()
EOF
wait "$QPID" || true
mkdir -p "$(dirname "$OUT")"
mv "$TMP/out.stream" "$OUT"
echo "wrote $OUT ($(stat -c %s "$OUT") bytes)" >&2
