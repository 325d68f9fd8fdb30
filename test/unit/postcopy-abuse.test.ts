// `snapctl load --postcopy` against a fake destination that abuses the return path (framing in
// reference §5.3): garbage, bad requests, malformed messages, a channel closed early, a silent
// peer. Each must end in a prompt exit with the right code, never a hang; a well-behaved fake
// destination gets exit 0, so the harness itself is shown to work. No QEMU: the destination is a
// script on the other end of the pipes.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { spawn } from 'node:child_process'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { ImageReader } from '../../src/container/reader.js'
import * as enc from '../../src/stream/encoder.js'
import { encodeRpMessage, type RpMessage } from '../../src/stream/return-path.js'
import { SNAPCTL_BIN, snapctl } from '../snapctl.js'
import { tempDir } from './container-helpers.js'

const w = tempDir('rp')
test.after(() => w.cleanup())
const fixture = join(dirname(fileURLToPath(import.meta.url)), '../../../test/fixtures/qemu10-pc-16M.stream')
const image = join(w.dir, 'vm.snap')
let block = { name: '', size: 0 }
let streamEnd = Buffer.alloc(0)

test.before(async () => {
  const r = await snapctl(['create', image, '--from', fixture])
  assert.is(r.code, 0, r.stderr)
  const reader = await ImageReader.open(image)
  block = reader.blocks[0]
  const id = reader.device.ramSectionId
  streamEnd = Buffer.concat([enc.sectionEndHeader(id), enc.eosFooter(id), Buffer.from([0])])
  await reader.close()
})

const TIMEOUT_MS = 1000
const msg = (m: RpMessage): Buffer => encodeRpMessage(m)
const raw = (type: number, payload: Buffer): Buffer => Buffer.concat([Buffer.from([type >> 8, type & 255, payload.length >> 8, payload.length & 255]), payload])

interface Peer {
  /** resolves once the stream so far contains `bytes` */
  seen(bytes: Buffer): Promise<void>
  send(b: Buffer): void
  close(): void
}

/** Runs load --postcopy with `script` as the destination; resolves with its exit and timing. */
function fakeDestination(script: (p: Peer) => Promise<void>): Promise<{ code: number | null; stderr: string; ms: number }> {
  const t0 = performance.now()
  const child = spawn(process.execPath, [SNAPCTL_BIN, 'load', '--postcopy', image], {
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, SNAPCTL_RETURN_PATH_TIMEOUT_MS: String(TIMEOUT_MS) },
  })
  let out = Buffer.alloc(0)
  let stderr = ''
  const waiters: Array<() => void> = []
  child.stdout.on('data', (d: Buffer) => {
    // Only a window is kept (the stream is megabytes); each waiter looks at every window.
    out = Buffer.concat([out.subarray(Math.max(0, out.length - 4096)), d])
    waiters.splice(0).forEach((f) => f())
  })
  child.stderr.on('data', (d: Buffer) => (stderr += d))
  child.stdin.on('error', () => {}) // it may exit before we are done writing
  const killer = setTimeout(() => child.kill('SIGKILL'), 20_000)
  const peer: Peer = {
    seen: async (bytes) => {
      while (!out.includes(bytes)) await new Promise<void>((r) => waiters.push(r))
    },
    send: (b) => void child.stdin.write(b),
    close: () => void child.stdin.end(),
  }
  void script(peer).catch(() => {})
  return new Promise((resolve) => {
    child.on('close', (code) => {
      clearTimeout(killer)
      resolve({ code, stderr, ms: performance.now() - t0 })
    })
  })
}

const advised = enc.ping(2)
const afterPong = (extra: (p: Peer) => void) => async (p: Peer) => {
  await p.seen(advised)
  p.send(msg({ type: 'pong', value: 2 }))
  extra(p)
}

function expect(label: string, code: string, script: (p: Peer) => Promise<void>): void {
  test(`${label}: ${code}, promptly`, async () => {
    const r = await fakeDestination(script)
    assert.is(r.code, 8, `exit ${r.code}: ${r.stderr}`)
    assert.match(r.stderr, new RegExp(`^snapctl: ${code}: `, 'm'))
    assert.ok(r.ms < 8000, `took ${r.ms.toFixed(0)} ms`)
  })
}

expect('garbage before the PONG', 'SNAP_RETURN_PATH', async (p) => p.send(Buffer.alloc(32, 0xee)))
expect('garbage after the PONG', 'SNAP_RETURN_PATH', afterPong((p) => p.send(Buffer.alloc(32, 0xee))))
expect('a request for a block the image does not have', 'SNAP_BAD_REQUEST', afterPong((p) => p.send(msg({ type: 'req', block: 'no-such-block', offset: 0, length: 4096 }))))
expect('a request past the end of the block', 'SNAP_BAD_REQUEST', afterPong((p) => p.send(msg({ type: 'req', block: block.name, offset: block.size, length: 4096 }))))
expect('a request at a misaligned offset', 'SNAP_BAD_REQUEST', afterPong((p) => p.send(msg({ type: 'req', block: block.name, offset: 100, length: 4096 }))))
expect('REQ_PAGES before any block was named', 'SNAP_BAD_REQUEST', afterPong((p) => p.send(msg({ type: 'req', block: null, offset: 0, length: 4096 }))))
expect('a PONG with a 5-byte payload', 'SNAP_RETURN_PATH', afterPong((p) => p.send(raw(2, Buffer.alloc(5)))))
expect('a message longer than the maximum payload', 'SNAP_RETURN_PATH', afterPong((p) => p.send(raw(3, Buffer.alloc(600)))))
expect('a message cut short by the close', 'SNAP_RETURN_PATH', afterPong((p) => {
  p.send(Buffer.from([0, 2, 0]))
  p.close()
}))
expect('SHUT with an error status', 'SNAP_RETURN_PATH', afterPong((p) => p.send(msg({ type: 'shut', status: 1 }))))
expect('PONG 1, then stdin closed (a destination without postcopy-ram)', 'SNAP_POSTCOPY_SETUP', async (p) => {
  await p.seen(advised)
  p.send(msg({ type: 'pong', value: 1 }))
  await new Promise((r) => setTimeout(r, 100))
  p.close()
})
expect('stdin closed with nothing on it (no destination QEMU)', 'SNAP_NO_DESTINATION', async (p) => {
  await p.seen(advised)
  p.close()
})
expect('stdin closed right after the PONG (the device state follows)', 'SNAP_RETURN_PATH', afterPong((p) => p.close()))
expect(`no PONG at all, stdin open (timeout ${TIMEOUT_MS} ms)`, 'SNAP_RETURN_PATH', async () => {})
expect('the stream ends but the return path is never closed', 'SNAP_RETURN_PATH', afterPong(() => {}))

test('a well-behaved destination (a page request, close after the end): exit 0', async () => {
  const r = await fakeDestination(async (p) => {
    await p.seen(advised)
    p.send(msg({ type: 'pong', value: 2 }))
    p.send(msg({ type: 'req', block: block.name, offset: 8 * 4096, length: 2 * 4096 }))
    p.send(msg({ type: 'req', block: null, offset: 64 * 4096, length: 4096 }))
    await p.seen(streamEnd)
    p.send(msg({ type: 'shut', status: 0 }))
    p.close()
  })
  assert.is(r.code, 0, r.stderr)
})

test.run()
