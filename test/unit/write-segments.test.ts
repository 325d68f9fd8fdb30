// load's pages written where they lie (native/lz4/writev.c, src/transport/write-segments.ts):
// writeSegments' exact bytes, through a full non-blocking pipe (short writes, EAGAIN), its
// refusals (a segment outside its buffer: nothing written; a closed pipe: EPIPE); and a load
// through the writer thread's vectored path (pages of LZ4 frames, of frames stored raw, of
// clusters stored raw, shared slots) byte for byte against the path that copies every page.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { spawn, execFileSync } from 'node:child_process'
import { closeSync, constants, openSync, readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { ImageWriter } from '../../src/container/writer.js'
import { loadImage } from '../../src/load.js'
import { fdOutgoing } from '../../src/transport/fd.js'
import { nativeWriteSegments } from '../../src/transport/write-segments.js'
import { capture, counters, device, migration, pageContent, rng, tempDir } from './container-helpers.js'

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

/**
 * An image whose clusters hold every kind of page a load sends: LZ4 frames, frames stored raw
 * (random pages), a cluster stored raw, pages stored once for several places, zero pages and
 * pages sent twice.
 */
async function mixedImage(path: string): Promise<void> {
  const rand = rng(7)
  const w = await ImageWriter.create(path, { clusterSize: 256 << 10, dedupe: true })
  w.setBlocks([
    { name: 'pc.ram', size: 1 << 20 },
    { name: 'pc.bios', size: 128 << 10 },
  ])
  const text = (i: number) => Buffer.alloc(PS, `page ${i} of text `)
  for (let p = 0; p < 32; p++) w.putPage(0, p, randomBytes(PS, 100 + p)) // a raw frame
  for (let p = 32; p < 64; p++) w.putPage(0, p, text(p)) // an LZ4 frame
  for (let p = 64; p < 128; p++) w.putPage(0, p, randomBytes(PS, 200 + p)) // a cluster stored raw
  for (let p = 128; p < 160; p++) w.putPage(0, p, text(p - 96)) // the same as 32..63: shared
  for (let p = 160; p < 200; p++) w.putPage(0, p, pageContent(rand))
  for (let p = 200; p < 210; p++) w.putZero(0, p)
  for (let p = 0; p < 32; p++) w.putPage(1, p, p % 2 ? randomBytes(PS, 300 + p) : text(p))
  w.putPage(0, 5, text(5)) // sent again: its first slot is dead
  await w.finish(device(), { source: 'qemu', counters: counters() })
}

test('load writes pages in place (writev) exactly the stream it writes by copying them', async () => {
  const image = join(t.dir, 'mixed.snap')
  await mixedImage(image)
  const copied = capture() // a sink without writeVector: load copies every page into its chunks
  await loadImage(image, { open: async () => migration(copied.sink), index: false })

  const to = join(t.dir, 'mixed.stream')
  let vectors = 0
  const fromBuffer = [0, 0, 0]
  await loadImage(image, {
    index: false,
    open: async (s) => {
      const m = await fdOutgoing({ to, sink: s })
      const write = m.main.writeVector!.bind(m.main)
      m.main.writeVector = (bufs, segs, length, onWritten) => {
        vectors++
        for (let i = 0; i < segs.length; i += 3) fromBuffer[segs[i]]++
        return write(bufs, segs, length, onWritten)
      }
      return m
    },
  })
  assert.ok(vectors >= 3, `clusters went out as vectors (${vectors})`)
  assert.ok(fromBuffer[1] > 0 && fromBuffer[2] > 0, `pages sent from decoded frames (${fromBuffer[1]}) and from where they were stored (${fromBuffer[2]})`)
  const got = readFileSync(to)
  assert.ok(got.equals(copied.all()), `the streams differ (${got.length} and ${copied.all().length} bytes)`)
})

test.run()
