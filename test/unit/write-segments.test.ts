// load's pages written where they lie (native/lz4/writev.c, src/transport/write-segments.ts):
// writeSegments' exact bytes, through a full non-blocking pipe (short writes, EAGAIN), and its
// refusals (a segment outside its buffer: nothing written; a closed pipe: EPIPE).
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { spawn, execFileSync } from 'node:child_process'
import { closeSync, constants, openSync, readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { nativeWriteSegments } from '../../src/transport/write-segments.js'
import { rng, tempDir } from './container-helpers.js'

const PS = 4096
const t = tempDir('write-segments')
test.after(() => t.cleanup())

const writeSegments = () => {
  const f = nativeWriteSegments()
  assert.ok(f, 'the addon is built (npm run build) and has writeSegments')
  return f!
}

function randomBytes(n: number, seed: number): Buffer {
  const rand = rng(seed)
  const b = Buffer.allocUnsafe(n)
  for (let i = 0; i < n; i++) b[i] = Math.floor(rand() * 256)
  return b
}

/** The segments' bytes, the slow way. */
function expected(bufs: Uint8Array[], segs: Int32Array): Buffer {
  const parts: Buffer[] = []
  for (let i = 0; i < segs.length; i += 3) parts.push(Buffer.from(bufs[segs[i]].buffer, bufs[segs[i]].byteOffset + segs[i + 1], segs[i + 2]))
  return Buffer.concat(parts)
}

test('writeSegments writes the segments in order, more than IOV_MAX of them, empty ones too', () => {
  const a = randomBytes(64 << 10, 1)
  const b = Buffer.from(new SharedArrayBuffer(32 << 10))
  randomBytes(32 << 10, 2).copy(b)
  const view = a.subarray(100, 5000) // offsets count from the view's start
  const segs: number[] = []
  for (let i = 0; i < 3000; i++) segs.push(i % 3, (i * 13) % 1000, i % 7 === 0 ? 0 : (i * 31) % 3000)
  const s = new Int32Array(segs)
  const path = join(t.dir, 'segs.bin')
  const fd = openSync(path, 'w')
  const n = writeSegments()(fd, [a, b, view], s)
  closeSync(fd)
  const want = expected([a, b, view], s)
  assert.is(n, want.length)
  assert.ok(readFileSync(path).equals(want), 'the file holds the segments in order')
})

test('writeSegments through a full non-blocking pipe: short writes and EAGAIN, every byte once', async () => {
  const fifo = join(t.dir, 'fifo')
  execFileSync('mkfifo', [fifo])
  const out = join(t.dir, 'from-fifo.bin')
  // A reader that opens the pipe, then waits before reading: the 64 KiB pipe fills at once.
  const reader = spawn('sh', ['-c', `exec 3<"${fifo}"; sleep 0.2; dd of="${out}" bs=4096 status=none <&3`])
  const done = new Promise<number>((r) => reader.on('exit', (c) => r(c ?? -1)))
  let wfd = -1
  for (let i = 0; wfd < 0; i++) {
    try {
      wfd = openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK) // ENXIO until the reader has it open
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENXIO' || i > 500) throw e
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 10)
    }
  }
  const pages = randomBytes(4 << 20, 3)
  const headers = Buffer.from(new SharedArrayBuffer(8 * 1024))
  for (let i = 0; i < 1024; i++) headers.writeBigUInt64BE(BigInt(i * PS + 8), 8 * i)
  const segs = new Int32Array(6 * 1024)
  for (let i = 0; i < 1024; i++) segs.set([0, 8 * i, 8, 1, i * PS, PS], 6 * i)
  const n = writeSegments()(wfd, [headers, pages], segs)
  closeSync(wfd)
  assert.is(await done, 0)
  assert.is(n, 1024 * (8 + PS))
  assert.ok(readFileSync(out).equals(expected([headers, pages], segs)), 'the reader got every byte once, in order')
})

test('writeSegments refuses a segment outside its buffer before writing anything', () => {
  const path = join(t.dir, 'refused.bin')
  const fd = openSync(path, 'w')
  const a = Buffer.alloc(100)
  const bad = [
    [0, 0, 10, 0, 95, 10], // past the end (the first segment is fine: nothing may be written)
    [0, -1, 10],
    [0, 0, -1],
    [1, 0, 1], // no such buffer
    [0, 0, 0x7fffffff],
  ]
  for (const segs of bad) {
    try {
      writeSegments()(fd, [a], new Int32Array(segs))
      assert.unreachable(`accepted ${segs}`)
    } catch (e) {
      assert.instance(e, RangeError, `${segs}`)
    }
  }
  assert.throws(() => writeSegments()(fd, [a], new Int32Array([0, 0])), /triples/)
  assert.throws(() => writeSegments()(fd, [new Uint16Array(4) as unknown as Uint8Array], new Int32Array([0, 0, 1])), /Uint8Arrays/)
  closeSync(fd)
  assert.is(statSync(path).size, 0)
})

test('writeSegments into a pipe whose reader has gone: EPIPE', () => {
  const fifo = join(t.dir, 'fifo-gone')
  execFileSync('mkfifo', [fifo])
  const r = openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK)
  const w = openSync(fifo, constants.O_WRONLY)
  closeSync(r)
  try {
    writeSegments()(w, [Buffer.alloc(10)], new Int32Array([0, 0, 10]))
    assert.unreachable('wrote into a pipe nobody reads')
  } catch (e) {
    assert.is((e as NodeJS.ErrnoException).code, 'EPIPE')
  } finally {
    closeSync(w)
  }
})

test.run()
