// Damaged, truncated, random and half-written images: each refused with its stable code.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { crc32 } from 'node:zlib'
import type { SnapError } from '../../src/errors.js'
import { ImageReader } from '../../src/container/reader.js'
import { ImageWriter } from '../../src/container/writer.js'
import { imageInfo } from '../../src/info.js'
import { verifyImage } from '../../src/verify.js'
import { BLOCKS, PS, makeImage, rng, tempDir } from './container-helpers.js'

const t = tempDir('bad')
test.after(() => t.cleanup())
let good: Buffer
let n = 0

test.before(async () => {
  const img = await makeImage(join(t.dir, 'good.snap'), { ops: 400, seed: 11 })
  good = readFileSync(img.path)
})

/** Open `bytes` as an image and read every cluster; the error code, or 'none'. */
async function codeOf(bytes: Buffer): Promise<string> {
  const path = join(t.dir, `case-${n++}.snap`)
  writeFileSync(path, bytes)
  let reader: ImageReader | undefined
  try {
    reader = await ImageReader.open(path)
    for await (const c of reader.clusters()) void c
    return 'none'
  } catch (e) {
    return (e as SnapError).code ?? `not a SnapError: ${e}`
  } finally {
    await reader?.close()
  }
}

const copy = () => Buffer.from(good)
const trailerOffset = (b: Buffer) => Number(b.readBigUInt64BE(80))
const trailerLength = (b: Buffer) => Number(b.readBigUInt64BE(88))

/** Rewrite the checksums that cover the trailer, so that only the change itself is seen. */
function resealTrailer(b: Buffer): void {
  const f = b.length - 64
  b.writeUInt32BE(crc32(b.subarray(trailerOffset(b), trailerOffset(b) + trailerLength(b))), f + 40)
  b.writeUInt32BE(crc32(b.subarray(f, f + 60)), f + 60)
}

/** File offset of the body of trailer record `type`. */
function recordBody(b: Buffer, type: number): number {
  let pos = trailerOffset(b)
  const end = pos + trailerLength(b)
  while (pos < end) {
    pos = Math.ceil((pos - trailerOffset(b)) / 8) * 8 + trailerOffset(b)
    const len = Number(b.readBigUInt64BE(pos + 8))
    if (b.readUInt32BE(pos) === type) return pos + 16
    pos += 16 + len
  }
  throw new Error(`no record ${type}`)
}

test('the good image reads', async () => {
  assert.is(await codeOf(copy()), 'none')
})

test('a bit flip in each structure gives its code', async () => {
  const flip = async (at: number) => {
    const b = copy()
    b[at] ^= 0x20
    return codeOf(b)
  }
  assert.is(await flip(3), 'SNAP_BAD_MAGIC')
  assert.is(await flip(50), 'SNAP_CHECKSUM') // header (uuid)
  assert.is(await flip(4096 + 40), 'SNAP_CHECKSUM') // cluster 0 header, a page entry
  assert.is(await flip(4096 + 1), 'SNAP_CORRUPT') // cluster 0 magic
  assert.is(await flip(8192 + 100), 'SNAP_CHECKSUM') // cluster 0 payload
  assert.is(await flip(trailerOffset(good) + 30), 'SNAP_CHECKSUM') // trailer
  assert.is(await flip(good.length - 30), 'SNAP_INCOMPLETE') // footer
  assert.is(await flip(good.length - 64), 'SNAP_INCOMPLETE') // footer magic
})

test('an unknown codec, with valid checksums, is SNAP_UNSUPPORTED_CODEC', async () => {
  const b = copy()
  const hl = b.readUInt32BE(4096 + 4)
  b[4096 + 12] = 9
  b.writeUInt32BE(crc32(b.subarray(4096, 4096 + hl - 4)), 4096 + hl - 4)
  assert.is(await codeOf(b), 'SNAP_UNSUPPORTED_CODEC')
})

test('truncation at many offsets', async () => {
  const cuts = [0, 1, 7, 8, 100, 4095, 4096, 5000, 8191, 8192, 12288, good.length - 4096, good.length - 65, good.length - 64, good.length - 1]
  const rand = rng(5)
  for (let i = 0; i < 20; i++) cuts.push(Math.floor(rand() * good.length))
  for (const cut of cuts) {
    const code = await codeOf(good.subarray(0, cut))
    assert.is(code, cut < 8 ? 'SNAP_BAD_MAGIC' : 'SNAP_TRUNCATED', `cut at ${cut}`)
  }
})

test('random bytes are not an image', async () => {
  const rand = rng(9)
  for (const size of [0, 10, 4096, 8192, 65536]) {
    const b = Buffer.alloc(size)
    for (let i = 0; i < size; i++) b[i] = Math.floor(rand() * 256)
    assert.is(await codeOf(b), 'SNAP_BAD_MAGIC', `size ${size}`)
  }
  assert.is(await codeOf(Buffer.alloc(65536)), 'SNAP_INCOMPLETE')
})

test('absurd counts and lengths are refused before anything is allocated', async () => {
  const count = async (type: number, value: number) => {
    const b = copy()
    b.writeUInt32BE(value, recordBody(b, type))
    resealTrailer(b)
    return codeOf(b)
  }
  assert.is(await count(3, 0xffffffff), 'SNAP_TOO_LARGE') // page_map run_count
  assert.is(await count(2, 0xffffffff), 'SNAP_TOO_LARGE') // block_table count
  assert.is(await count(7, 0xffffffff), 'SNAP_TOO_LARGE') // cluster_directory count
  assert.is(await count(3, 1), 'SNAP_CORRUPT') // run_count smaller than the runs
  const b = copy()
  const rec = recordBody(b, 4) - 16
  b.writeUInt32BE(0x7fffffff, rec + 12) // record length past the trailer
  resealTrailer(b)
  assert.is(await codeOf(b), 'SNAP_CORRUPT')
  const c = copy()
  c.writeUInt32BE(0xffffff00, recordBody(c, 7) + 4 + 4) // a cluster offset outside the file
  resealTrailer(c)
  assert.is(await codeOf(c), 'SNAP_CORRUPT')
})

test('a half-written image is SNAP_INCOMPLETE, and info says so without failing', async () => {
  const path = join(t.dir, 'partial.snap')
  const w = await ImageWriter.create(path)
  w.setBlocks(BLOCKS)
  for (let p = 0; p < 400; p++) w.putPage(0, p, Buffer.alloc(PS, p & 0xff))
  await w.drain()
  const partial = join(t.dir, `.partial.snap.partial-${process.pid}`)
  await new Promise((r) => setTimeout(r, 50))
  assert.is(await codeOf(readFileSync(partial)), 'SNAP_INCOMPLETE')
  const info = await imageInfo(partial)
  assert.is(info.complete, false)
  await w.abort()
  // A finished image whose footer was lost is incomplete too.
  const cut = copy()
  cut.fill(0, cut.length - 64)
  assert.is(await codeOf(cut), 'SNAP_INCOMPLETE')
})

test('verify lists every damaged cluster with its number and offset', async () => {
  const b = copy()
  const dir = recordBody(b, 7)
  const off1 = Number(b.readBigUInt64BE(dir + 4 + 8))
  b[4096 + 8192 - 1] ^= 1 // payload of cluster 0
  b[off1 + 40] ^= 1 // header of cluster 1
  const path = join(t.dir, 'two-bad.snap')
  writeFileSync(path, b)
  const r = await verifyImage(path)
  assert.is(r.ok, false)
  assert.equal(r.problems.map((p) => [p.code, p.cluster, p.offset]), [['SNAP_CHECKSUM', 0, 4096], ['SNAP_CHECKSUM', 1, off1]])
  assert.is(r.clustersOk, r.clusters - 2)
  const bad = join(t.dir, 'bad-magic.snap')
  writeFileSync(bad, Buffer.alloc(9000, 1))
  assert.equal((await verifyImage(bad)).problems.map((p) => p.code), ['SNAP_BAD_MAGIC'])
})

test.run()
