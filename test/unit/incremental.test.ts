// Incremental images (container.md, "base_image (type 8)", "Incremental images"): the record's
// exact bytes and bad records; a chain of 3 written through the writer's base comparison and read
// back page for page (data, zero, base and never sent kept apart); flatten; a missing, changed,
// replaced or looping base refused with its code before any page is read.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { copyFileSync, renameSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { decodeBaseImage, encodeBaseImage } from '../../src/container/base-image.js'
import { openImage, writerBase, type RestoreImage } from '../../src/container/chain.js'
import { INCOMPAT_BASE_IMAGE } from '../../src/container/header.js'
import { ImageReader } from '../../src/container/reader.js'
import { BASE_CLUSTER, REC_BASE_IMAGE, decodeTrailer } from '../../src/container/trailer.js'
import { ImageWriter, type WriterBase } from '../../src/container/writer.js'
import { storeWorkingSet } from '../../src/container/working-set.js'
import { flattenImage } from '../../src/flatten.js'
import { verifyImage } from '../../src/verify.js'
import { imageInfo } from '../../src/info.js'
import { BLOCKS, PS, checkPages, counters, device, makeImage, mkey, pageContent, rng, tempDir, type Model } from './container-helpers.js'

const code = async (p: Promise<unknown>): Promise<string> => p.then(() => 'ok', (e) => (e as { code: string }).code)

test('base_image: exact bytes, round trip, bad records are SNAP_CORRUPT', () => {
  const ref = { uuid: Buffer.alloc(16, 0xab), generation: 2, fileLength: 0x3000, trailerCrc: 0x01020304, path: 'b.snap' }
  const buf = encodeBaseImage(ref)
  assert.is(buf.toString('hex'), '00000001' + '00000000' + 'ab'.repeat(16) + '0000000000000002' + '0000000000003000' + '01020304' + '0000' + '0006' + Buffer.from('b.snap').toString('hex'))
  assert.equal(decodeBaseImage(buf), ref)
  const bad = (mutate: (b: Buffer) => Buffer) => {
    try {
      decodeBaseImage(mutate(Buffer.from(buf)))
      return 'ok'
    } catch (e) {
      return (e as { code: string }).code
    }
  }
  assert.is(bad((b) => b.subarray(0, b.length - 1)), 'SNAP_CORRUPT', 'path cut')
  assert.is(bad((b) => b.subarray(0, 20)), 'SNAP_CORRUPT', 'header cut')
  assert.is(bad((b) => (b.writeUInt32BE(2, 0), b)), 'SNAP_CORRUPT', 'version')
  assert.is(bad((b) => (b.writeUInt16BE(0, 46), b)), 'SNAP_CORRUPT', 'empty path')
  assert.is(bad((b) => (b.writeUInt16BE(0xffff, 46), b)), 'SNAP_CORRUPT', 'oversized path')
  assert.is(bad((b) => (b[48] = 0, b)), 'SNAP_CORRUPT', 'NUL in the path')
  assert.is(bad((b) => (b.writeBigUInt64BE(0n, 24), b)), 'SNAP_CORRUPT', 'generation 0')
  assert.is(bad((b) => Buffer.concat([b, Buffer.from('x')])), 'SNAP_CORRUPT', 'bytes after the path')
})

type Layer = Map<string, Buffer | 'zero'>

/** A child of `base` (a chain): changed pages, zeroed pages, unchanged re-sends, pages never sent. */
async function child(path: string, base: RestoreImage, below: Layer, seed: number): Promise<{ model: Layer; basePages: number }> {
  const rand = rng(seed)
  const w = await ImageWriter.create(path, { clusterSize: 65536, base: writerBase(base, path) })
  w.setBlocks(BLOCKS)
  const model: Layer = new Map()
  const scratch = Buffer.alloc(PS)
  let same = 0
  BLOCKS.forEach((blk, b) => {
    for (let p = 0; p < blk.size / PS; p++) {
      const r = rand()
      const k = mkey(b, p)
      const old = below.get(k)
      if (r < 0.1) continue // never sent in this image, whatever the base has
      if (r < 0.2) {
        w.putZero(b, p)
        model.set(k, 'zero')
        if (old === 'zero') same++
      } else if (r < 0.35 || old === undefined) {
        const data = pageContent(rand)
        w.putPage(b, p, data)
        model.set(k, data)
      } else {
        const data = old === 'zero' ? Buffer.alloc(PS) : Buffer.from(old)
        w.putPage(b, p, data) // unchanged: stored as a base run
        model.set(k, old === 'zero' ? 'zero' : data)
        same++
      }
      if (rand() < 0.02) {
        w.readPage(b, p, scratch)
        const want = model.get(k)
        assert.ok(want === undefined || (want === 'zero' ? scratch.every((x) => x === 0) : scratch.equals(want)), `readPage ${k}`)
      }
    }
  })
  const s = await w.finish(device(), { source: 'qemu', counters: counters() })
  assert.is(s.basePages, same)
  return { model, basePages: same }
}

test('a chain of 3: written against its base, read back page for page; flatten; verify; info', async () => {
  const { dir, cleanup } = tempDir('incr')
  try {
    const made = await makeImage(join(dir, 'a.snap'), { ops: 1200, seed: 3 })
    const m0: Layer = made.model as Model
    const a = await openImage(join(dir, 'a.snap'))
    const c1 = await child(join(dir, 'b.snap'), a, m0, 11)
    await a.close()
    const b = await openImage(join(dir, 'b.snap'))
    assert.ok('layers' in b && b.layers.length === 2)
    const c2 = await child(join(dir, 'c.snap'), b, c1.model, 12)
    await b.close()
    assert.ok(c1.basePages > 100 && c2.basePages > 100)

    const top = await ImageReader.open(join(dir, 'c.snap'))
    assert.is(top.header.incompatibleFeatures & INCOMPAT_BASE_IMAGE, INCOMPAT_BASE_IMAGE)
    assert.is(top.base!.path, 'b.snap', 'relative to the image')
    assert.ok(top.runs.some((r) => r.cluster === BASE_CLUSTER))
    const at = new Map<number, number>()
    decodeTrailer(await top.source.read(top.header.trailerOffset, top.header.trailerLength), top.header.trailerOffset, at)
    assert.is(at.get(REC_BASE_IMAGE), top.header.baseImageOffset)
    await top.close()

    const chain = await openImage(join(dir, 'c.snap'))
    checkPages(chain, c2.model, 'chain')
    await chain.close()

    const flat = await flattenImage(join(dir, 'c.snap'), join(dir, 'flat.snap'))
    assert.is(flat.layers, 3)
    const f = await openImage(join(dir, 'flat.snap'))
    assert.ok(f instanceof ImageReader && f.base === null)
    checkPages(f, c2.model, 'flat')
    await f.close()

    const v = await verifyImage(join(dir, 'c.snap'))
    assert.ok(v.ok, JSON.stringify(v.problems))
    assert.equal(v.chain!.map((l) => l.path), ['c.snap', 'b.snap', 'a.snap'].map((n) => join(dir, n)))
    const info = await imageInfo(join(dir, 'c.snap'))
    assert.ok(info.complete && info.chain && info.chain.layers.length === 3 && info.basePages === c2.basePages)
    assert.is(await code(flattenImage(join(dir, 'c.snap'), join(dir, 'b.snap'), { force: true })), 'SNAP_USAGE', 'a base is never replaced')
  } finally {
    cleanup()
  }
})

test('re-sent pages that become equal to the base again, and compaction, keep base runs', async () => {
  const { dir, cleanup } = tempDir('incr-compact')
  try {
    const made = await makeImage(join(dir, 'a.snap'), { ops: 1200, seed: 8, resend: 0 })
    const below = made.model as Model
    const a = await openImage(join(dir, 'a.snap'))
    const path = join(dir, 'b.snap')
    const w = await ImageWriter.create(path, { clusterSize: 65536, base: writerBase(a, path) })
    w.setBlocks(BLOCKS)
    const rand = rng(9)
    const model: Layer = new Map()
    const keys = [...below.keys()]
    // Every page the base has, first sent changed (filling clusters), then as the base has it:
    // nearly every stored copy is dead, so the writer compacts before it finishes.
    for (const k of keys) {
      const [b, p] = k.split(':').map(Number)
      w.putPage(b, p, pageContent(rand))
      if (w.needsDrain()) await w.drain()
    }
    for (const [i, k] of keys.entries()) {
      const [b, p] = k.split(':').map(Number)
      const old = below.get(k)!
      if (i % 10 === 0) {
        const data = pageContent(rand)
        w.putPage(b, p, data)
        model.set(k, data)
      } else {
        w.putPage(b, p, old === 'zero' ? Buffer.alloc(PS) : old)
        model.set(k, old)
      }
      if (w.needsDrain()) await w.drain()
    }
    const s = await w.finish(device(), { source: 'qemu', counters: counters() })
    assert.ok(s.compacted, 'compacted')
    assert.is(s.deadBytes, 0)
    assert.is(s.basePages, keys.length - Math.ceil(keys.length / 10))
    await a.close()
    const chain = await openImage(path)
    checkPages(chain, model, 'compacted chain')
    await chain.close()
  } finally {
    cleanup()
  }
})

test('a missing, replaced, changed or looping base is refused with its code; verify and info say so', async () => {
  const { dir, cleanup } = tempDir('incr-bad')
  try {
    const p = (n: string) => join(dir, n)
    const made = await makeImage(p('a.snap'), { ops: 400, seed: 5 })
    const a = await openImage(p('a.snap'))
    await child(p('b.snap'), a, made.model as Model, 21)
    await a.close()
    copyFileSync(p('a.snap'), p('a.keep'))

    renameSync(p('a.snap'), p('a.gone'))
    assert.is(await code(openImage(p('b.snap'))), 'SNAP_BASE_MISSING')
    const v = await verifyImage(p('b.snap'))
    assert.is(v.ok, false)
    assert.is(v.problems[0].code, 'SNAP_BASE_MISSING')
    const info = await imageInfo(p('b.snap'))
    assert.is(info.complete && info.chain?.error?.code, 'SNAP_BASE_MISSING')

    await makeImage(p('a.snap'), { ops: 400, seed: 5 }) // the same content, another image
    assert.is(await code(openImage(p('b.snap'))), 'SNAP_BASE_CHANGED')

    copyFileSync(p('a.keep'), p('a.snap'))
    assert.is(await code(openImage(p('b.snap'))), 'ok')
    await storeWorkingSet(p('a.snap'), { pages: Uint32Array.from([0, 1]), recordedTime: 1 })
    assert.is(await code(openImage(p('b.snap'))), 'SNAP_BASE_CHANGED', 'generation bumped')

    // x.snap names y.snap (as it is), y.snap names x.snap: a loop.
    const fake = (ref: WriterBase['ref']): WriterBase => ({ ref, blocks: [], same: () => false, read: (_b, _p, into) => void into.fill(0) })
    const write = async (path: string, base: WriterBase) => {
      const w = await ImageWriter.create(path, { clusterSize: 65536, base: { ...base, blocks: BLOCKS.map((x, id) => ({ ...x, id, pageSize: PS })) } })
      w.setBlocks(BLOCKS)
      w.putPage(0, 0, Buffer.alloc(PS, 7))
      await w.finish(device(), { source: 'qemu', counters: counters() })
    }
    await write(p('y.snap'), fake({ uuid: Buffer.alloc(16), generation: 1, fileLength: 8192, trailerCrc: 0, path: 'x.snap' }))
    const y = await ImageReader.open(p('y.snap'))
    const yRef = { uuid: y.header.uuid, generation: 1, fileLength: y.fileLength, trailerCrc: y.footer.trailerCrc, path: 'y.snap' }
    await y.close()
    await write(p('x.snap'), fake(yRef))
    assert.is(await code(openImage(p('x.snap'))), 'SNAP_BASE_LOOP')
    await write(p('self.snap'), fake({ ...yRef, path: 'self.snap' }))
    assert.is(await code(openImage(p('self.snap'))), 'SNAP_BASE_LOOP')
    rmSync(p('a.keep'))
  } finally {
    cleanup()
  }
})

test.run()
