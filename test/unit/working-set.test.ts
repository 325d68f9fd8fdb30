// The working_set record (container.md, "working_set (type 9)", "Storing a working set"):
// exact bytes, checks, and an image that has one is still read by version 1's rules.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { copyFileSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { ImageReader } from '../../src/container/reader.js'
import { decodeHeader } from '../../src/container/header.js'
import { decodeTrailer } from '../../src/container/trailer.js'
import { COMPAT_WORKING_SET, REC_WORKING_SET, decodeWorkingSet, encodeWorkingSet, storeWorkingSet, workingSetOf } from '../../src/container/working-set.js'

const FIXTURE = join(process.cwd(), 'test/fixtures/v1-pc-16M.snap')
const blocks = [{ id: 0, name: 'pc.ram', size: 16 * 4096, pageSize: 4096 }, { id: 1, name: 'vga', size: 2 * 4096, pageSize: 4096 }]

test('working_set: exact bytes and round trip', () => {
  const buf = encodeWorkingSet({ pages: Uint32Array.from([0, 5, 1, 1]), recordedTime: 0x0102030405 })
  assert.is(buf.toString('hex'), '00000001' + '00000002' + '0000000102030405' + '00000000' + '00000005' + '00000001' + '00000001')
  const ws = decodeWorkingSet(buf, blocks as never)
  assert.equal([...ws.pages], [0, 5, 1, 1])
  assert.is(ws.recordedTime, 0x0102030405)
})

test('working_set: bad records are SNAP_CORRUPT', () => {
  const bad = (pages: number[], mutate?: (b: Buffer) => Buffer): string => {
    let b = encodeWorkingSet({ pages: Uint32Array.from(pages), recordedTime: 1 })
    if (mutate) b = mutate(b)
    try {
      decodeWorkingSet(b, blocks as never)
      return 'ok'
    } catch (e) {
      return (e as { code: string }).code
    }
  }
  assert.is(bad([0, 16]), 'SNAP_CORRUPT') // past the block
  assert.is(bad([2, 0]), 'SNAP_CORRUPT') // no such block
  assert.is(bad([0, 1, 0, 1]), 'SNAP_CORRUPT') // repeated
  assert.is(bad([0, 1], (b) => b.subarray(0, b.length - 1)), 'SNAP_CORRUPT') // short
  assert.is(bad([0, 1], (b) => (b.writeUInt32BE(2, 0), b)), 'SNAP_CORRUPT') // version
  assert.is(bad([0, 1], (b) => (b.writeUInt32BE(1 << 30, 4), b)), 'SNAP_CORRUPT') // count
})

test('storing a working set: read back; version 1 rules still read the image as before', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'snapctl-ws-'))
  try {
    const path = join(dir, 'img.snap')
    copyFileSync(FIXTURE, path)
    const before = await ImageReader.open(path)
    assert.is(workingSetOf(before), null)
    const oldRecords = before.records
    const oldHeader = before.header
    await before.close()
    const pages = Uint32Array.from([0, 3, 0, 1, 0, 2])
    await storeWorkingSet(path, { pages, recordedTime: 1234 })
    assert.equal(readdirSync(dir), ['img.snap'], 'no copy left behind')

    const after = await ImageReader.open(path)
    assert.equal([...workingSetOf(after)!.pages], [...pages])
    assert.is(after.header.generation, oldHeader.generation + 1)
    await after.close()

    // The rules of a version-1 reader, by hand: no incompatible bit, footer and trailer as
    // before, record 9 unknown and skipped, every other record and every cluster byte unchanged.
    const file = readFileSync(path)
    const h = decodeHeader(file.subarray(0, 4096), file.length)
    assert.is(h.incompatibleFeatures, 0n)
    assert.is(h.compatibleFeatures & COMPAT_WORKING_SET, COMPAT_WORKING_SET)
    const recs = decodeTrailer(file.subarray(h.trailerOffset, h.trailerOffset + h.trailerLength))
    for (const [t, body] of oldRecords) assert.ok(recs.get(t)!.equals(body), `record ${t} unchanged`)
    assert.ok(recs.has(REC_WORKING_SET))
    const orig = readFileSync(FIXTURE)
    assert.ok(file.subarray(4096, h.trailerOffset).equals(orig.subarray(4096, oldHeader.trailerOffset)), 'clusters unchanged')

    // Replacing it keeps one record.
    await storeWorkingSet(path, { pages: Uint32Array.from([0, 7]), recordedTime: 5 })
    const again = await ImageReader.open(path)
    assert.equal([...workingSetOf(again)!.pages], [0, 7])
    await again.close()
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test.run()
