// The page index: rebuilt when missing, stale or unreadable; checked by verify.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { cpSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Level } from 'level'
import { ImageReader } from '../../src/container/reader.js'
import { PageIndex } from '../../src/index/page-index.js'
import * as K from '../../src/index/keys.js'
import { verifyImage } from '../../src/verify.js'
import { PAGE_NEVER_SENT } from '../../src/types.js'
import { PS, makeImage, mkey, tempDir, type MadeImage } from './container-helpers.js'

const t = tempDir('index')
test.after(() => t.cleanup())
let a: MadeImage
let b: MadeImage

test.before(async () => {
  a = await makeImage(join(t.dir, 'a.snap'), { ops: 500, seed: 21 })
  b = await makeImage(join(t.dir, 'b.snap'), { ops: 500, seed: 22 })
})

/** Open the index (recording what it logs) and compare every page with the model. */
async function openAndCompare(img: MadeImage): Promise<string[]> {
  const log: string[] = []
  const reader = await ImageReader.open(img.path)
  const index = await PageIndex.open(reader, { log: (m) => log.push(m) })
  try {
    for (let blk = 0; blk < img.blocks.length; blk++) {
      for (let p = 0; p < img.blocks[blk].size / PS; p++) {
        const want = img.model.get(mkey(blk, p))
        const got = await index.readPage(img.blocks[blk].name, p * PS)
        if (want === undefined) assert.is(got, null)
        else if (want === 'zero') assert.is(got, 'zero')
        else assert.ok(Buffer.isBuffer(got) && got.equals(want), `page ${blk}:${p}`)
      }
    }
    const all = await index.loadAll()
    assert.equal(all.runs, reader.runs)
    assert.equal(all.clusters.map((c) => c.offset), reader.clusterOffsets)
  } finally {
    await index.close()
    await reader.close()
  }
  return log
}

test('a fresh index is used as it is', async () => {
  assert.equal(await openAndCompare(a), [])
})

test('a deleted index is rebuilt', async () => {
  rmSync(PageIndex.indexPath(a.path), { recursive: true })
  const log = await openAndCompare(a)
  assert.is(log.length, 1)
  assert.match(log[0], 'missing')
  assert.equal(await openAndCompare(a), [])
})

test("another image's index is stale and rebuilt", async () => {
  rmSync(PageIndex.indexPath(a.path), { recursive: true })
  cpSync(PageIndex.indexPath(b.path), PageIndex.indexPath(a.path), { recursive: true })
  const log = await openAndCompare(a)
  assert.match(log[0], 'stale')
})

test('corrupted index files are deleted and rebuilt', async () => {
  const dir = PageIndex.indexPath(a.path)
  for (const f of readdirSync(dir)) writeFileSync(join(dir, f), Buffer.alloc(300, 0xa5))
  const log = await openAndCompare(a)
  assert.match(log[0], 'unreadable')
})

test('verify: a missing index is built; a stale or wrong one is SNAP_INDEX_MISMATCH', async () => {
  rmSync(PageIndex.indexPath(a.path), { recursive: true })
  assert.is((await verifyImage(a.path)).index, 'missing') // verify writes nothing unless asked
  let r = await verifyImage(a.path, { rebuildIndex: true })
  assert.is(r.ok, true)
  assert.is(r.index, 'built')
  assert.ok(r.deadBytes <= 0.02 * r.fileBytes)
  assert.is((await verifyImage(a.path)).index, 'ok')

  rmSync(PageIndex.indexPath(a.path), { recursive: true })
  cpSync(PageIndex.indexPath(b.path), PageIndex.indexPath(a.path), { recursive: true })
  r = await verifyImage(a.path)
  assert.equal(r.problems.map((p) => p.code), ['SNAP_INDEX_MISMATCH'])
  assert.is(r.imageOk, true)
  assert.is(r.ok, false)

  // Fresh by its stamp but one run moved: only the entry-by-entry check sees it.
  rmSync(PageIndex.indexPath(a.path), { recursive: true })
  const reader = await ImageReader.open(a.path)
  await PageIndex.build(reader)
  await reader.close()
  const db = new Level<Buffer, Buffer>(PageIndex.indexPath(a.path), { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  const [[key, value]] = await db.iterator({ ...K.RUNS_RANGE, limit: 1 }).all()
  const v = K.decodeRunValue(value)
  await db.put(key, K.encodeRunValue({ ...v, pageCount: v.pageCount + 1 }))
  await db.close()
  r = await verifyImage(a.path)
  assert.equal(r.problems.map((p) => p.code), ['SNAP_INDEX_MISMATCH'])
  assert.is(r.imageOk, true)
})

test('lookup out of range and never-sent pages', async () => {
  const reader = await ImageReader.open(b.path)
  const index = await PageIndex.open(reader)
  try {
    const last = b.blocks[0].size - 1
    const loc = await index.lookup(0, last)
    if (!b.model.has(mkey(0, Math.floor(last / PS)))) assert.is(loc.state, PAGE_NEVER_SENT)
    for (const bad of [-1, b.blocks[0].size, 1.5, Number.MAX_SAFE_INTEGER]) {
      try {
        await index.lookup(0, bad)
        assert.unreachable()
      } catch (e) {
        assert.is((e as { code: string }).code, 'SNAP_NO_PAGE')
      }
    }
  } finally {
    await index.close()
    await reader.close()
  }
})

test.run()
