// `snapctl load --postcopy` against a fake destination that abuses the return path (framing in
// reference §5.3): garbage, bad requests, malformed messages, a channel closed early, a silent
// peer. Each must end in a prompt exit with the right code, never a hang; a well-behaved fake
// destination gets exit 0, so the harness itself is shown to work. No QEMU: the destination is a
// script on the other end of the pipes.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
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
let blocks: Array<{ name: string; size: number; pageSize: number }> = []
let streamEnd = Buffer.alloc(0)

test.before(async () => {
  const r = await snapctl(['create', image, '--from', fixture])
  assert.is(r.code, 0, r.stderr)
  const reader = await ImageReader.open(image)
  block = reader.blocks[0]
  blocks = reader.blocks
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
function fakeDestination(script: (p: Peer) => Promise<void>, extra: string[] = []): Promise<{ code: number | null; stderr: string; ms: number }> {
  const t0 = performance.now()
  const child = spawn(process.execPath, [SNAPCTL_BIN, 'load', '--postcopy', image, ...extra], {
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

// Postcopy recovery (load --postcopy --recover): RECV_BITMAP per block, then POSTCOPY_RESUME.
const pagesOf = (b: { size: number; pageSize: number }): number => b.size / b.pageSize
const words = (pages: number): number => Math.ceil(pages / 64) * 8
const fullBitmap = (b: { size: number; pageSize: number }): Buffer => {
  const m = Buffer.alloc(words(pagesOf(b)))
  for (let p = 0; p < pagesOf(b); p++) m[p >> 3] |= 1 << (p & 7)
  return m
}
/** Answers the bitmap requests with `bitmaps` (default: every page received), then RESUME_ACK(`ack`). */
const recovering = (bitmaps: () => Buffer[], ack = 1, after: (p: Peer) => Promise<void> = async () => {}) => async (p: Peer) => {
  await p.seen(enc.recvBitmap(blocks[blocks.length - 1].name))
  p.send(Buffer.concat(bitmaps()))
  await p.seen(enc.postcopyResume())
  p.send(msg({ type: 'resume-ack', value: ack }))
  await after(p)
}
const allReceived = (): Buffer[] => blocks.map((b) => msg({ type: 'recv-bitmap', block: b.name, bitmap: fullBitmap(b) }))

function expectRecover(label: string, code: string, script: (p: Peer) => Promise<void>): void {
  test(`--recover, ${label}: ${code}, promptly`, async () => {
    const r = await fakeDestination(script, ['--recover'])
    assert.is(r.code, 8, `exit ${r.code}: ${r.stderr}`)
    assert.match(r.stderr, new RegExp(`^snapctl: ${code}: `, 'm'))
    assert.ok(r.ms < 8000, `took ${r.ms.toFixed(0)} ms`)
  })
}

expectRecover('a bitmap one word short', 'SNAP_RECV_BITMAP', recovering(() => {
  const out = allReceived()
  out[0] = msg({ type: 'recv-bitmap', block: blocks[0].name, bitmap: fullBitmap(blocks[0]).subarray(8) })
  return out
}))
expectRecover('a bitmap of a block not asked for', 'SNAP_RECV_BITMAP', recovering(() => [msg({ type: 'recv-bitmap', block: 'no-such-block', bitmap: Buffer.alloc(8) }), ...allReceived()]))
expectRecover('a block\'s bitmap twice', 'SNAP_RECV_BITMAP', recovering(() => [allReceived()[0], ...allReceived()]))
expectRecover('a page past the end of the block marked received', 'SNAP_RECV_BITMAP', recovering(() => {
  const b = blocks.find((x) => pagesOf(x) % 64 !== 0)!
  const m = fullBitmap(b)
  m[m.length - 1] = 0x80
  return blocks.map((x) => msg({ type: 'recv-bitmap', block: x.name, bitmap: x === b ? m : fullBitmap(x) }))
}))
expectRecover('a damaged end marker', 'SNAP_RECV_BITMAP', recovering(() => {
  const out = allReceived()
  out[0] = Buffer.from(out[0])
  out[0][out[0].length - 1] ^= 1
  return out
}))
expectRecover('a bitmap size that is not whole words', 'SNAP_RECV_BITMAP', recovering(() => {
  const out = allReceived()
  const m = Buffer.from(out[0])
  m.writeUInt32BE(5, 4 + 1 + blocks[0].name.length + 4)
  out[0] = m
  return out
}))
expectRecover('RESUME_ACK(0)', 'SNAP_RETURN_PATH', recovering(allReceived, 0))
expectRecover('the return path closed before the bitmaps', 'SNAP_RETURN_PATH', async (p) => {
  await p.seen(enc.recvBitmap(blocks[0].name))
  p.close()
})
expectRecover(`no bitmaps at all (timeout ${TIMEOUT_MS} ms)`, 'SNAP_RETURN_PATH', async () => {})

test('--recover, a destination that has every page: resumed, nothing sent but the end, exit 0', async () => {
  const stats = join(w.dir, 'recover.stats')
  const r = await fakeDestination(recovering(allReceived, 1, async (p) => {
    p.send(msg({ type: 'req', block: block.name, offset: 8 * 4096, length: 4096 })) // a page it has: no answer
    await p.seen(streamEnd)
    p.send(msg({ type: 'shut', status: 0 }))
    p.close()
  }), ['--recover', '--stats', stats])
  assert.is(r.code, 0, r.stderr)
  const s = JSON.parse(readFileSync(stats, 'utf8'))
  const total = blocks.reduce((a, b) => a + pagesOf(b), 0)
  assert.is(s.pagesReceivedBefore, total, JSON.stringify(s))
  assert.is(s.pagesSent, 0, JSON.stringify(s))
  // the request may come after the END is queued (nothing was left to push), and is then not counted
  assert.ok(s.requests === 1 && s.requestsAlreadySent <= 1 && s.pagesServedOnRequest === 0, JSON.stringify(s))
  assert.ok(s.bytesOut < 4096, JSON.stringify(s))
})

test('--recover with --record: SNAP_USAGE', async () => {
  const r = await snapctl(['load', '--postcopy', '--recover', '--record', image, '--connect', 'unix:/nonexistent'])
  assert.is(r.code, 2, r.stderr)
  assert.match(r.stderr, /SNAP_USAGE/)
})

test.run()
