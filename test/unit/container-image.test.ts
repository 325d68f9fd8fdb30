// Writer -> reader -> index round trips over random page sequences with re-sends.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { existsSync, readdirSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import type { SnapError } from '../../src/errors.js'
import { ImageReader } from '../../src/container/reader.js'
import { ImageWriter } from '../../src/container/writer.js'
import { PageIndex } from '../../src/index/page-index.js'
import { PAGE_DATA, PAGE_NEVER_SENT, PAGE_ZERO } from '../../src/types.js'
import { BLOCKS, PS, counters, device, makeImage, mkey, tempDir, type MadeImage } from './container-helpers.js'

const t = tempDir('image')
test.after(() => t.cleanup())

async function rejects(p: Promise<unknown>): Promise<string> {
  try {
    await p
  } catch (e) {
    return (e as SnapError).code
  }
  return 'none'
}

/** Every page of every block, read through the reader and through the index, matches the model. */
async function checkAll(img: MadeImage): Promise<void> {
  const reader = await ImageReader.open(img.path)
  const index = await PageIndex.open(reader)
  try {
    const decoded = new Map<number, Buffer>()
    for await (const c of reader.clusters({ readAhead: 3 })) decoded.set(c.seq, c.raw)
    assert.is(decoded.size, reader.clusterOffsets.length)
    for (let b = 0; b < img.blocks.length; b++) {
      for (let p = 0; p < img.blocks[b].size / PS; p++) {
        const want = img.model.get(mkey(b, p))
        const loc = reader.locate(b, p)
        const viaIndex = await index.readPage(b, p * PS + (p % 7))
        if (want === undefined) {
          assert.is(loc.state, PAGE_NEVER_SENT)
          assert.is(viaIndex, null)
        } else if (want === 'zero') {
          assert.is(loc.state, PAGE_ZERO)
          assert.is(viaIndex, 'zero')
        } else {
          assert.is(loc.state, PAGE_DATA)
          const raw = decoded.get(loc.cluster!)!
          assert.ok(raw.subarray(loc.slot! * PS, (loc.slot! + 1) * PS).equals(want), `page ${b}:${p} via reader`)
          assert.ok((viaIndex as Buffer).equals(want), `page ${b}:${p} via index`)
        }
      }
    }
    const byName = await index.lookup(img.blocks[0].name, 0)
    assert.equal(byName, await index.lookup(0, 0))
    assert.is(await rejects(index.lookup(0, img.blocks[0].size)), 'SNAP_NO_PAGE')
    assert.is(await rejects(index.lookup('no.such.block', 0)), 'SNAP_NO_PAGE')
    assert.is(await index.check(reader), null)
  } finally {
    await index.close()
    await reader.close()
  }
}

test('random pages with re-sends round-trip through reader and index', async () => {
  const img = await makeImage(join(t.dir, 'a.snap'), { ops: 2000, seed: 7, cacheBytes: 128 * 1024 })
  assert.ok(img.summary.clusters > 10)
  assert.is(img.summary.indexError, undefined)
  await checkAll(img)
})

test('many re-sends of sealed pages: compacted, dead bytes at most 2%', async () => {
  const img = await makeImage(join(t.dir, 'b.snap'), { ops: 3000, seed: 3, resend: 0.8 })
  assert.ok(img.summary.compacted)
  assert.ok(img.summary.deadBytes <= 0.02 * img.summary.fileBytes, `dead ${img.summary.deadBytes}`)
  const reader = await ImageReader.open(img.path)
  const s = await reader.summary()
  assert.is(s.deadBytes, img.summary.deadBytes)
  await reader.close()
  await checkAll(img)
})

test('compression none stores every cluster raw; device state is kept byte for byte', async () => {
  const img = await makeImage(join(t.dir, 'c.snap'), { ops: 300, compress: 'none' })
  const reader = await ImageReader.open(img.path)
  const s = await reader.summary()
  assert.is(s.compression, 'none')
  assert.is(s.codecs.lz4, 0)
  assert.equal(reader.device, device())
  assert.is(reader.streamInfo.source, 'qemu')
  assert.is(s.ramBlocks.length, BLOCKS.length)
  await reader.close()
  await checkAll(img)
})

test("clusters({ reuse: 'manual' }): a cluster's raw stays as decoded until released, then its buffer is used again", async () => {
  for (const compress of ['lz4', 'none'] as const) {
    const img = await makeImage(join(t.dir, `manual-${compress}.snap`), { ops: 1500, seed: 11, compress })
    const reader = await ImageReader.open(img.path)
    try {
      const want = new Map<number, Buffer>()
      for await (const c of reader.clusters()) want.set(c.seq, Buffer.from(c.raw))
      assert.ok(want.size > 8, `${want.size} clusters`)
      // Held, none released: no buffer may be reused under a cluster still held.
      const held: Array<{ seq: number; raw: Buffer; release?: () => void }> = []
      for await (const c of reader.clusters({ readAhead: 2, reuse: 'manual' })) held.push(c)
      assert.is(held.length, want.size)
      for (const c of held) assert.ok(c.raw.equals(want.get(c.seq)!), `${compress}: cluster ${c.seq} changed while held`)
      for (const c of held) c.release!()
      // Released at once: a few buffers serve the whole scan, each raw right when handed out.
      const buffers = new Set<ArrayBufferLike>()
      for await (const c of reader.clusters({ readAhead: 2, reuse: 'manual' })) {
        assert.ok(c.raw.equals(want.get(c.seq)!), `${compress}: cluster ${c.seq}`)
        buffers.add(c.raw.buffer)
        c.release!()
        c.release!() // a second call is harmless
      }
      assert.ok(buffers.size <= 4, `${compress}: ${buffers.size} buffers`)
    } finally {
      await reader.close()
    }
  }
})

test('an image with no pages', async () => {
  const w = await ImageWriter.create(join(t.dir, 'empty.snap'))
  w.setBlocks(BLOCKS)
  const s = await w.finish(device(), { source: 'libvirt', counters: counters(), libvirtHeader: Buffer.from('LibvirtQemudSave') })
  assert.is(s.clusters, 0)
  assert.is(s.fileBytes, 8192)
  const r = await ImageReader.open(s.path)
  assert.is(r.locate(0, 0).state, PAGE_NEVER_SENT)
  assert.equal(r.streamInfo.libvirtHeader, Buffer.from('LibvirtQemudSave'))
  await r.close()
})

test('a re-sent page in the open cluster is replaced in place; a zeroed one leaves no hole', async () => {
  const w = await ImageWriter.create(join(t.dir, 'inplace.snap'), { clusterSize: 65536 })
  w.setBlocks([{ name: 'ram', size: 64 * PS }])
  const page = (v: number) => Buffer.alloc(PS, v)
  for (let p = 0; p < 8; p++) w.putPage(0, p, page(p + 1))
  w.putPage(0, 3, page(0x33))
  w.putZero(0, 1)
  const scratch = Buffer.alloc(PS)
  assert.is(w.readPage(0, 3, scratch), PAGE_DATA)
  assert.ok(scratch.equals(page(0x33)))
  assert.is(w.readPage(0, 1, scratch), PAGE_ZERO)
  assert.is(w.readPage(0, 40, scratch), PAGE_NEVER_SENT)
  const s = await w.finish(device(), { source: 'qemu', counters: counters() })
  assert.is(s.deadBytes, 0)
  assert.is(s.storedPages, 7)
  assert.is(s.zeroPages, 1)
  const r = await ImageReader.open(s.path)
  const c = await r.readCluster(0)
  assert.is(c.pages.length, 14)
  assert.ok(c.raw.subarray(r.locate(0, 7).slot! * PS).subarray(0, PS).equals(page(8)))
  await r.close()
})

test('an existing image is refused without force and replaced with it', async () => {
  const path = join(t.dir, 'exists.snap')
  writeFileSync(path, 'precious')
  assert.is(await rejects(ImageWriter.create(path)), 'SNAP_EXISTS')
  const img = await makeImage(path, { ops: 50, force: true })
  assert.is(statSync(path).size, img.summary.fileBytes)
})

test('an image that appears while writing is not overwritten', async () => {
  const path = join(t.dir, 'race.snap')
  const w = await ImageWriter.create(path)
  w.setBlocks(BLOCKS)
  w.putPage(0, 0, Buffer.alloc(PS, 1))
  writeFileSync(path, 'precious')
  assert.is(await rejects(w.finish(device(), { source: 'qemu', counters: counters() })), 'SNAP_EXISTS')
  assert.is(statSync(path).size, 8)
  assert.equal(readdirSync(t.dir).filter((f) => f.includes('race.snap.partial')), [])
})

test('abort leaves no file; stale partial files are removed; a running create locks', async () => {
  const path = join(t.dir, 'aborted.snap')
  const stale = join(t.dir, '.aborted.snap.partial-999999999')
  writeFileSync(stale, 'left by a dead create')
  const w = await ImageWriter.create(path)
  assert.not.ok(existsSync(stale))
  w.setBlocks(BLOCKS)
  for (let p = 0; p < 500; p++) w.putPage(0, p, Buffer.alloc(PS, p))
  assert.is(await rejects(ImageWriter.create(path)), 'SNAP_LOCKED')
  await w.abort()
  await w.abort()
  assert.equal(readdirSync(t.dir).filter((f) => f.includes('aborted.snap')), [])
})

test('image and index are private: 0600 files, 0700 index directory', async () => {
  const img = await makeImage(join(t.dir, 'mode.snap'), { ops: 100 })
  assert.is(statSync(img.path).mode & 0o777, 0o600)
  const dir = PageIndex.indexPath(img.path)
  assert.is(statSync(dir).mode & 0o777, 0o700)
  const files = readdirSync(dir)
  assert.ok(files.length > 0)
  for (const f of files) assert.is(statSync(join(dir, f)).mode & 0o777, 0o600, f)
})

test.run()
