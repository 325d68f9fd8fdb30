// Identical pages stored once (format-spec/container.md, "Shared slots", incompatible bit 4): the
// bytes of a shared run; a page repeated in two blocks, at another offset and re-sent with the
// content of its stored copy, written once and restored right by every reader (the locator, load
// --to, the mapped-ram export, the page index, flatten, verify, info, a lazy restore's page
// fetcher); compaction keeps a slot only shared pages still use; bad shared runs are SNAP_CORRUPT;
// a reader that does not know the bit refuses the image.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { crc32 } from 'node:zlib'
import { openImage, writerBase } from '../../src/container/chain.js'
import { INCOMPAT_SHARED_SLOTS, SUPPORTED_INCOMPATIBLE, decodeHeader } from '../../src/container/header.js'
import { ImageReader } from '../../src/container/reader.js'
import { SlotFinder } from '../../src/container/dedupe.js'
import { SHARED_RUN, decodePageMap, encodePageMap, type PageRun } from '../../src/container/trailer.js'
import { ImageWriter, type WriterOptions } from '../../src/container/writer.js'
import { createImage } from '../../src/create.js'
import { exportMappedRam } from '../../src/mapped-ram-export.js'
import { flattenImage } from '../../src/flatten.js'
import { imageInfo } from '../../src/info.js'
import { loadImage } from '../../src/load.js'
import { verifyImage } from '../../src/verify.js'
import { PageIndex } from '../../src/index/page-index.js'
import { PageFetcher } from '../../src/postcopy/page-fetcher.js'
import type { DeviceState, RamBlock } from '../../src/types.js'
import { BLOCKS, PS, checkPages, counters, device, mkey, pageContent, rng, tempDir, type Model } from './container-helpers.js'
import { configElement, deviceTail } from './stream-helpers.js'

const t = tempDir('shared')
test.after(() => t.cleanup())
const code = async (p: Promise<unknown>): Promise<string> => p.then(() => 'ok', (e) => (e as { code: string }).code)
/** a device state the stream parser accepts, so that exported streams can be read back by create */
const dev = (): DeviceState => ({ ...device(), config: configElement(), ...deviceTail() })

test('page_map: a shared run is bit 31 of first_slot, only with incompatible bit 4', () => {
  const blocks: RamBlock[] = [{ id: 0, name: 'pc.ram', size: 64 * PS, pageSize: PS }]
  const runs: PageRun[] = [
    { blockId: 0, firstPage: 0, pageCount: 2, cluster: 0, firstSlot: 0 },
    { blockId: 0, firstPage: 2, pageCount: 3, cluster: 0, firstSlot: 1, shared: true },
  ]
  const body = encodePageMap(runs)
  assert.is(body.toString('hex'), '00000002' + '00000000' + '00000000' + '00000002' + '00000000' + '00000000' +
    '00000000' + '00000002' + '00000003' + '00000000' + '80000001')
  assert.equal(decodePageMap(body, blocks, 1, 16, false, true), runs)
  const bad = (b: Buffer, shared: boolean): string => {
    try {
      decodePageMap(b, blocks, 1, 16, false, shared)
      return 'ok'
    } catch (e) {
      return (e as { code: string }).code
    }
  }
  assert.is(bad(body, false), 'SNAP_CORRUPT', 'the shared bit in an image without incompatible bit 4')
  const zero = encodePageMap([{ blockId: 0, firstPage: 0, pageCount: 1, cluster: 0xffffffff, firstSlot: 0 }])
  zero.writeUInt32BE(SHARED_RUN, 4 + 16)
  assert.is(bad(zero, true), 'SNAP_CORRUPT', 'a zero run is never shared')
  const past = encodePageMap([{ blockId: 0, firstPage: 0, pageCount: 4, cluster: 0, firstSlot: 14, shared: true }])
  assert.is(bad(past, true), 'SNAP_CORRUPT', 'slots past the largest cluster')
})

test('the fingerprint only proposes: equal pages agree, the table is bounded', () => {
  const a = pageContent(rng(1))
  assert.is(SlotFinder.fingerprint(a), SlotFinder.fingerprint(Buffer.from(a)))
  const f = new SlotFinder(1 << 30)
  f.remember(SlotFinder.fingerprint(a), 3, 7)
  assert.equal(f.propose(SlotFinder.fingerprint(a)), { cluster: 3, slot: 7 })
  assert.is(f.propose(SlotFinder.fingerprint(a) ^ 1), null)
})

/**
 * Pages that repeat: the same content in two blocks and at other offsets, re-sent unchanged,
 * re-sent changed after others shared their slot, and enough clusters (64 KiB) that shares
 * point into sealed ones. Returns the model of what each page restores.
 */
async function writeRepeats(path: string, opts: WriterOptions & { seed?: number; resendEvery?: number } = {}): Promise<{ model: Model; shared: number }> {
  const rand = rng(opts.seed ?? 5)
  const w = await ImageWriter.create(path, { clusterSize: 65536, dedupe: true, ...opts })
  w.setBlocks(BLOCKS)
  const model: Model = new Map()
  const put = (b: number, p: number, data: Buffer) => {
    w.putPage(b, p, data)
    model.set(mkey(b, p), data)
  }
  const kinds = Array.from({ length: 12 }, () => pageContent(rand))
  const scratch = Buffer.alloc(PS)
  for (let i = 0; i < 900; i++) {
    const b = rand() < 0.8 ? 0 : 1
    const p = Math.floor(rand() * (BLOCKS[b].size / PS))
    const r = rand()
    if (r < 0.4) put(b, p, kinds[Math.floor(rand() * kinds.length)]) // repeated content
    else if (r < 0.9) put(b, p, pageContent(rand))
    else {
      w.putZero(b, p)
      model.set(mkey(b, p), 'zero')
    }
    if (i % (opts.resendEvery ?? 7) === 0) {
      // re-send a page already sent: unchanged (its stored copy, or the slot it shares), or changed
      const keys = [...model.keys()]
      const k = keys[Math.floor(rand() * keys.length)]
      const [kb, kp] = k.split(':').map(Number)
      const have = model.get(k)!
      if (rand() < 0.5 && have !== 'zero') put(kb, kp, Buffer.from(have))
      else put(kb, kp, pageContent(rand))
    }
    if (i % 13 === 0) {
      const k = [...model.keys()][Math.floor(rand() * model.size)]
      const [kb, kp] = k.split(':').map(Number)
      w.readPage(kb, kp, scratch)
      const want = model.get(k)!
      assert.ok(want === 'zero' ? scratch.every((x) => x === 0) : scratch.equals(want), `readPage ${k} at op ${i}`)
    }
    if (w.needsDrain()) await w.drain()
  }
  const s = await w.finish(dev(), { source: 'qemu', counters: counters() })
  return { model, shared: s.sharedPages }
}

/** A file a reader wrote (a stream, a mapped-ram file) read back by create without dedupe, and checked. */
async function checkExport(file: string, model: Model, what: string, neverAsZero = false): Promise<void> {
  const back = `${file}.snap`
  await createImage(back, { from: file, dedupe: false })
  const img = await openImage(back)
  try {
    assert.is(img.locator.totals().sharedPages, 0)
    checkPages(img, model, what, neverAsZero)
  } finally {
    await img.close()
  }
}

test('a page repeated in two blocks, at other offsets and re-sent is stored once, and every reader restores it', async () => {
  const path = join(t.dir, 'rep.snap')
  const { model, shared } = await writeRepeats(path)
  assert.ok(shared > 100, `${shared} shared pages`)
  const reader = await ImageReader.open(path)
  assert.is(reader.header.incompatibleFeatures & INCOMPAT_SHARED_SLOTS, INCOMPAT_SHARED_SLOTS)
  assert.ok(reader.runs.some((r) => r.shared))
  const cross = reader.runs.some((r) => r.shared && reader.runs.some((o) => !o.shared && o.cluster === r.cluster && o.blockId !== r.blockId))
  assert.ok(cross, 'some page shares a slot named by a page of another block')
  checkPages(reader, model, 'locator')

  // The lazy restore's fetcher, by frame, for every shared page.
  const fetch = new PageFetcher(reader)
  const where = reader.locator.pageLocator()
  let lazy = 0
  BLOCKS.forEach((blk, b) => {
    for (let p = 0; p < blk.size / PS; p++) {
      if (!where.isShared(b, p)) continue
      const got = fetch.page(where.cluster(b, p), where.slotOf(b, p), b, p, true)
      assert.ok(Buffer.from(got).equals(model.get(mkey(b, p)) as Buffer), `fetched ${b}:${p}`)
      lazy++
    }
  })
  assert.is(lazy, shared)
  await reader.close()

  const stream = join(t.dir, 'rep.stream')
  const r = await loadImage(path, { to: stream })
  assert.is(r.storedPages, [...model.values()].filter((v) => v !== 'zero').length, 'every data page sent once')
  await checkExport(stream, model, 'load --to')
  const mapped = join(t.dir, 'rep.mapped')
  await exportMappedRam(path, { to: mapped })
  await checkExport(mapped, model, 'mapped-ram', true) // mapped-ram has no "never sent": a clear bit reads as zero

  const ir = await ImageReader.open(path)
  const index = await PageIndex.open(ir)
  try {
    for (const [k, want] of model) {
      const [b, p] = k.split(':').map(Number)
      const got = await index.readPage(b, p * PS)
      assert.ok(want === 'zero' ? got === 'zero' : Buffer.isBuffer(got) && got.equals(want), `index ${k}`)
    }
  } finally {
    await index.close()
    await ir.close()
  }

  const v = await verifyImage(path)
  assert.ok(v.ok, JSON.stringify(v.problems))
  assert.is(v.deadBytes, (await imageInfo(path) as { deadBytes: number }).deadBytes)
  const info = await imageInfo(path)
  assert.ok(info.complete && info.sharedPages === shared)

  const flat = join(t.dir, 'rep-flat.snap')
  await flattenImage(path, flat)
  const f = await openImage(flat)
  checkPages(f, model, 'flatten')
  await f.close()
})

test('without dedupe every page is stored: no shared run, no bit 4, the same pages', async () => {
  const path = join(t.dir, 'nodedupe.snap')
  const { model, shared } = await writeRepeats(path, { dedupe: false })
  assert.is(shared, 0)
  const reader = await ImageReader.open(path)
  assert.is(reader.header.incompatibleFeatures & INCOMPAT_SHARED_SLOTS, 0n)
  checkPages(reader, model, 'no dedupe')
  await reader.close()
})

test('compaction keeps slots that only shared pages still use', async () => {
  const path = join(t.dir, 'compact.snap')
  const w = await ImageWriter.create(path, { clusterSize: 65536, dedupe: true })
  w.setBlocks(BLOCKS)
  const rand = rng(21)
  const model: Model = new Map()
  const pages = BLOCKS[0].size / PS
  // Block 0 first; block 1 repeats some of its pages (shared); then block 0 is sent again, changed:
  // nearly every stored copy is dead, and the slots block 1 shares keep only their sharers.
  const first: Buffer[] = []
  for (let p = 0; p < pages; p++) {
    first.push(pageContent(rand))
    w.putPage(0, p, first[p])
    if (w.needsDrain()) await w.drain()
  }
  for (let p = 0; p < BLOCKS[1].size / PS; p++) {
    const data = first[(p * 7) % pages]
    w.putPage(1, p, data)
    model.set(mkey(1, p), data)
  }
  for (let p = 0; p < pages; p++) {
    const data = pageContent(rand)
    w.putPage(0, p, data)
    model.set(mkey(0, p), data)
    if (w.needsDrain()) await w.drain()
  }
  const s = await w.finish(dev(), { source: 'qemu', counters: counters() })
  assert.ok(s.compacted, 'compacted')
  assert.ok(s.deadBytes <= 0.02 * s.fileBytes, `${s.deadBytes} dead`)
  const img = await openImage(path)
  checkPages(img, model, 'compacted')
  await img.close()
  const v = await verifyImage(path)
  assert.ok(v.ok, JSON.stringify(v.problems))
})

test('a chain over a base with shared runs: the child replaces owners of shared slots, every page read through the layers', async () => {
  const made = await writeRepeats(join(t.dir, 'chain-base.snap'), { seed: 9 })
  assert.ok(made.shared > 50)
  const base = await openImage(join(t.dir, 'chain-base.snap'))
  const path = join(t.dir, 'chain-top.snap')
  // The child: half of the base's pages sent again changed (owners of shared slots among them), the rest unchanged (base runs).
  const w = await ImageWriter.create(path, { clusterSize: 65536, base: writerBase(base, path), dedupe: true })
  w.setBlocks(BLOCKS)
  const rand = rng(31)
  const model: Model = new Map()
  for (const [k, v] of made.model) {
    const [b, p] = k.split(':').map(Number)
    if (rand() < 0.5) {
      const data = pageContent(rand)
      w.putPage(b, p, data)
      model.set(k, data)
    } else {
      w.putPage(b, p, v === 'zero' ? Buffer.alloc(PS) : v)
      model.set(k, v)
    }
    if (w.needsDrain()) await w.drain()
  }
  const s = await w.finish(dev(), { source: 'qemu', counters: counters() })
  assert.ok(s.basePages > 100, `${s.basePages} base pages`)
  await base.close()
  const chain = await openImage(path)
  checkPages(chain, model, 'chain')
  await chain.close()
  const stream = join(t.dir, 'chain.stream')
  await loadImage(path, { to: stream })
  await checkExport(stream, model, 'chain load --to')
})

/** Rewrite the checksums that cover the trailer, so that only the change itself is seen. */
function resealTrailer(b: Buffer): void {
  const h = decodeHeader(b.subarray(0, 4096), b.length)
  const f = b.length - 64
  b.writeUInt32BE(crc32(b.subarray(h.trailerOffset, h.trailerOffset + h.trailerLength)), f + 40)
  b.writeUInt32BE(crc32(b.subarray(f, f + 60)), f + 60)
}

/** File offset of the page map's runs (record 3 follows records 1 and 2). */
function pageMapAt(b: Buffer): number {
  const h = decodeHeader(b.subarray(0, 4096), b.length)
  let pos = h.trailerOffset
  for (;;) {
    pos = h.trailerOffset + Math.ceil((pos - h.trailerOffset) / 8) * 8
    if (b.readUInt32BE(pos) === 3) return pos + 16 + 4
    pos += 16 + Number(b.readBigUInt64BE(pos + 8))
  }
}

test('bad shared runs are SNAP_CORRUPT before a page is sent; an unknown bit 4 is refused', async () => {
  const path = join(t.dir, 'rep.snap')
  const good = readFileSync(path)
  const reader = await ImageReader.open(path)
  const i = reader.runs.findIndex((r) => r.shared)
  const run = reader.runs[i]
  const count = (await reader.clusterInfos())[run.cluster].pageCount
  await reader.close()
  const at = pageMapAt(good) + 20 * i
  // A shared run pointing past its cluster's pages (within the largest cluster): refused when the cluster is read.
  const past = Buffer.from(good)
  past.writeUInt32BE((SHARED_RUN | (count - run.pageCount + 1)) >>> 0, at + 16)
  resealTrailer(past)
  writeFileSync(join(t.dir, 'past.snap'), past)
  assert.is(await code(loadImage(join(t.dir, 'past.snap'), { to: join(t.dir, 'past.stream'), index: false })), 'SNAP_CORRUPT')
  const v = await verifyImage(join(t.dir, 'past.snap'), { index: false })
  assert.is(v.ok, false)
  assert.is(v.problems[0].code, 'SNAP_CORRUPT')
  // The shared bit cleared: an owned run whose slots name other pages.
  const owned = Buffer.from(good)
  owned.writeUInt32BE(run.firstSlot, at + 16)
  resealTrailer(owned)
  writeFileSync(join(t.dir, 'owned.snap'), owned)
  assert.is(await code(loadImage(join(t.dir, 'owned.snap'), { to: join(t.dir, 'owned.stream'), index: false })), 'SNAP_CORRUPT')
  // Bit 4 cleared from the header: the shared bit is then corrupt.
  const nobit = Buffer.from(good)
  nobit.writeBigUInt64BE(nobit.readBigUInt64BE(16) & ~INCOMPAT_SHARED_SLOTS, 16)
  const hl = nobit.readUInt32BE(12)
  nobit.writeUInt32BE(crc32(nobit.subarray(0, hl - 4)), hl - 4)
  writeFileSync(join(t.dir, 'nobit.snap'), nobit)
  assert.is(await code(ImageReader.open(join(t.dir, 'nobit.snap'))), 'SNAP_CORRUPT')
  // A reader that does not know bit 4 (snapctl before shared slots) refuses rather than misreads.
  assert.ok((SUPPORTED_INCOMPATIBLE & INCOMPAT_SHARED_SLOTS) !== 0n)
  const later = Buffer.from(good)
  later.writeBigUInt64BE(later.readBigUInt64BE(16) | (1n << 5n), 16)
  later.writeUInt32BE(crc32(later.subarray(0, hl - 4)), hl - 4)
  writeFileSync(join(t.dir, 'later.snap'), later)
  assert.is(await code(ImageReader.open(join(t.dir, 'later.snap'))), 'SNAP_UNSUPPORTED_FEATURE')
})

test.run()
