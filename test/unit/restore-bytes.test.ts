// The exact bytes a restore writes for a tiny image made here with the container writer (two
// blocks; data pages, a page written twice, zero pages, pages never sent): `loadImage` compared
// byte for byte with the stream built from the encoder, and the lazy restore's session driven
// in-process with a fake return path, its setup checked byte for byte and a requested page
// answered ahead of the background push.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { PassThrough } from 'node:stream'
import { copyFileSync } from 'node:fs'
import { join } from 'node:path'
import { ImageWriter } from '../../src/container/writer.js'
import { loadImage } from '../../src/load.js'
import { loadPostcopy } from '../../src/postcopy.js'
import { storeWorkingSet } from '../../src/container/working-set.js'
import * as enc from '../../src/stream/encoder.js'
import { encodeRpMessage } from '../../src/stream/return-path.js'
import type { RamBlockDecl } from '../../src/types.js'
import { capture, counters, device, migration, tempDir } from './container-helpers.js'

const PS = 4096
const t = tempDir('restore-bytes')
test.after(() => t.cleanup())
const image = join(t.dir, 'tiny.snap')
/** the same pages stored raw: unframed clusters, as every image before framed clusters had */
const rawImage = join(t.dir, 'tiny-raw.snap')
const d = device()
const ID = d.ramSectionId
const BLOCKS: RamBlockDecl[] = [
  { name: 'pc.ram', size: 8 * PS },
  { name: 'pc.bios', size: 2 * PS },
]
const page = (fill: number): Buffer => Buffer.alloc(PS, fill)

test.before(async () => {
  await writeTiny(image, 'lz4')
  await writeTiny(rawImage, 'none')
})

async function writeTiny(path: string, compress: 'lz4' | 'none'): Promise<void> {
  const w = await ImageWriter.create(path, { clusterSize: 65536, compress })
  w.setBlocks(BLOCKS)
  w.putZero(0, 0)
  w.putPage(0, 1, page(0x11))
  w.putPage(0, 2, page(0x22)) // replaced below, in its slot of the open cluster
  w.putPage(1, 0, page(0x33))
  w.putZero(0, 5)
  w.putPage(0, 2, page(0x44))
  w.putZero(1, 1)
  // 0:3, 0:4, 0:6, 0:7 never sent
  await w.finish(d, { source: 'qemu', counters: counters() })
}

test('load writes exactly the stream the encoder builds', async () => {
  const out = capture()
  const r = await loadImage(image, { open: async () => migration(out.sink, null), index: false })
  const want = new enc.PageRecordWriter(BLOCKS)
  want.raw(enc.fileHeader(d.config))
  want.raw(enc.ramStartSection({ sectionId: ID, instanceId: d.ramInstanceId, version: d.ramVersion }, BLOCKS))
  want.raw(enc.sectionPartHeader(ID))
  want.zero(0, 0) // zero pages first, in block and page order
  want.zero(0, 5)
  want.zero(1, 1)
  want.page(0, 1, page(0x11)) // then the live slots, in cluster order
  want.page(0, 2, page(0x44))
  want.page(1, 0, page(0x33))
  want.raw(enc.eosFooter(ID))
  want.raw(enc.sectionEndHeader(ID)) // ramEnd
  want.raw(enc.eosFooter(ID))
  want.raw(d.deviceSections)
  want.raw(d.streamEnd)
  const expected = Buffer.concat(want.flush())
  assert.ok(out.all().equals(expected), `the stream differs from the expected ${expected.length} bytes (got ${out.all().length})`)
  assert.is(r.pagesSent, 6)
  assert.is(r.bytesOut, expected.length)
})

/** One PART section of a lazy restore (every record names its block; null data: a ZERO record). */
function part(records: Array<[number, number, Buffer | null]>): Buffer {
  const w = new enc.PageRecordWriter(BLOCKS)
  w.raw(enc.sectionPartHeader(ID))
  for (const [b, p, data] of records) {
    w.forgetBlock()
    if (data) w.page(b, p, data)
    else w.zero(b, p)
  }
  w.raw(enc.eosFooter(ID))
  return Buffer.concat(w.flush())
}

for (const [name, img, framed] of [['framed clusters', image, true], ['unframed clusters', rawImage, false]] as const) test(`postcopy (${name}): the setup, then a requested page ahead of the push, then the end`, async () => {
  const setup1 = Buffer.concat([enc.fileHeader(d.config), enc.openReturnPath(), enc.ping(1), enc.postcopyAdvise(PS, PS), enc.ping(2)])
  const blob = Buffer.concat([enc.postcopyListen(), d.deviceSections, enc.ping(3), enc.postcopyRun()])
  const setup2 = Buffer.concat([
    enc.ramStartSection({ sectionId: ID, instanceId: d.ramInstanceId, version: d.ramVersion }, BLOCKS),
    enc.postcopyRamDiscard('pc.ram', [[0, PS]]),
    enc.packaged(blob.length),
    blob,
  ])
  const answer = part([[0, 2, page(0x44)]])
  // 0:2 was sent already; then every page not sent, zero or never sent, as ZERO records
  const push = part([[0, 1, page(0x11)], [1, 0, page(0x33)], [0, 0, null], [0, 3, null], [0, 4, null], [0, 5, null], [0, 6, null], [0, 7, null], [1, 1, null]])
  const end = Buffer.concat([enc.sectionEndHeader(ID), enc.eosFooter(ID), Buffer.from([0])])
  const expected = Buffer.concat([setup1, setup2, answer, push, end])

  const rp = new PassThrough()
  let ponged = false
  let shut = false
  const out = capture((all) => {
    const sofar = all()
    // The destination answers ADVISE's PING, and asks for page 0:2 in the same breath.
    if (!ponged && sofar.length >= setup1.length) {
      ponged = true
      rp.write(Buffer.concat([encodeRpMessage({ type: 'pong', value: 2 }), encodeRpMessage({ type: 'req', block: 'pc.ram', offset: 2 * PS, length: PS })]))
    }
    if (!shut && sofar.length >= expected.length) {
      shut = true
      rp.end(encodeRpMessage({ type: 'shut', status: 0 }))
    }
  })
  const stats = await loadPostcopy(img, { open: async () => migration(out.sink, rp), timeoutMs: 5000 })
  const got = out.all()
  assert.ok(got.subarray(0, setup1.length).equals(setup1), 'header, configuration, OPEN_RETURN_PATH, PING 1, ADVISE, PING 2')
  assert.ok(got.subarray(setup1.length, setup1.length + setup2.length).equals(setup2), 'ram START, DISCARD, PACKAGED[LISTEN, devices, PING 3, RUN]')
  assert.ok(got.subarray(setup1.length + setup2.length).equals(Buffer.concat([answer, push, end])), 'the answer, then the push, then END and EOF')
  assert.is(stats.requests, 1)
  assert.is(stats.pagesSent, 10, 'every page of both blocks is placed before the END')
  // The request read one frame of a framed cluster; an unframed one whole.
  assert.equal([stats.requestFramesRead, stats.requestClustersRead], framed ? [1, 0] : [0, 1])
})

/** Drives loadPostcopy over a fake destination that answers PING 2 and shuts once `expected` is out; what it wrote, and its stats. */
async function lazyBytes(img: string, setup1Length: number, expectedLength: number, precopyMax?: number): Promise<{ got: Buffer; stats: Awaited<ReturnType<typeof loadPostcopy>> }> {
  const rp = new PassThrough()
  let ponged = false
  let shut = false
  const out = capture((all) => {
    const sofar = all()
    if (!ponged && sofar.length >= setup1Length) {
      ponged = true
      rp.write(encodeRpMessage({ type: 'pong', value: 2 }))
    }
    if (!shut && sofar.length >= expectedLength) {
      shut = true
      rp.end(encodeRpMessage({ type: 'shut', status: 0 }))
    }
  })
  const stats = await loadPostcopy(img, { open: async () => migration(out.sink, rp), timeoutMs: 5000, precopyMax })
  return { got: out.all(), stats }
}

test('postcopy with a working set: its pages as precopy RAM sections between the discard and the device state, up to --precopy-max; the rest of it first after RUN', async () => {
  const img = join(t.dir, 'tiny-ws.snap')
  copyFileSync(image, img)
  // 0:2 (data), 0:0 (zero: sent as ZERO, the guest touches it), 1:0 (data), in that order
  await storeWorkingSet(img, { pages: Uint32Array.from([0, 2, 0, 0, 1, 0]), recordedTime: 1 })
  const setup1 = Buffer.concat([enc.fileHeader(d.config), enc.openReturnPath(), enc.ping(1), enc.postcopyAdvise(PS, PS), enc.ping(2)])
  const blob = Buffer.concat([enc.postcopyListen(), d.deviceSections, enc.ping(3), enc.postcopyRun()])
  const start = Buffer.concat([enc.ramStartSection({ sectionId: ID, instanceId: d.ramInstanceId, version: d.ramVersion }, BLOCKS), enc.postcopyRamDiscard('pc.ram', [[0, PS]])])
  const pkg = Buffer.concat([enc.packaged(blob.length), blob])
  const end = Buffer.concat([enc.sectionEndHeader(ID), enc.eosFooter(ID), Buffer.from([0])])
  const rest = part([[0, 1, page(0x11)], [0, 3, null], [0, 4, null], [0, 5, null], [0, 6, null], [0, 7, null], [1, 1, null]])

  // The default bound holds all of it: every working-set page is in RAM before LISTEN.
  const all = Buffer.concat([setup1, start, part([[0, 2, page(0x44)], [0, 0, null], [1, 0, page(0x33)]]), pkg, rest, end])
  const a = await lazyBytes(img, setup1.length, all.length)
  assert.ok(a.got.equals(all), `the stream differs from the expected ${all.length} bytes (got ${a.got.length})`)
  assert.equal([a.stats.workingSetPages, a.stats.prefetchedPages, a.stats.precopiedPages, a.stats.pagesSent], [3, 3, 3, 10])

  // --precopy-max of one page: 0:2 before the device state, 0:0 and 1:0 first after it.
  const one = Buffer.concat([setup1, start, part([[0, 2, page(0x44)]]), pkg, part([[0, 0, null], [1, 0, page(0x33)]]), rest, end])
  const b = await lazyBytes(img, setup1.length, one.length, PS)
  assert.ok(b.got.equals(one), `the stream differs from the expected ${one.length} bytes (got ${b.got.length})`)
  assert.equal([b.stats.prefetchedPages, b.stats.precopiedPages, b.stats.pagesSent], [3, 1, 10])

  // 0: the whole working set after RUN, as before precopy existed.
  const none = Buffer.concat([setup1, start, pkg, part([[0, 2, page(0x44)], [0, 0, null], [1, 0, page(0x33)]]), rest, end])
  const c = await lazyBytes(img, setup1.length, none.length, 0)
  assert.ok(c.got.equals(none), `the stream differs from the expected ${none.length} bytes (got ${c.got.length})`)
  assert.equal([c.stats.prefetchedPages, c.stats.precopiedPages], [3, 0])
})

test.run()
