// Exact bytes and round trips for every container and index codec.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { randomBytes } from 'node:crypto'
import { crc32 } from 'node:zlib'
import lz4 from 'lz4-napi'
import type { SnapError } from '../../src/errors.js'
import { decodeHeader, encodeHeader, type ImageHeader } from '../../src/container/header.js'
import { decodeFooter, encodeFooter } from '../../src/container/footer.js'
import {
  FLAG_FRAMED, decodeClusterHeader, decodeFrameSync, decodePayload, decodePayloadSync, encodeClusterHeader, encodeFrames, frameExtent, frameTableCrc, splitCluster,
} from '../../src/container/cluster.js'
import { roundUp } from '../../src/bytes.js'
import * as T from '../../src/container/trailer.js'
import { PageMap } from '../../src/container/locator.js'
import * as K from '../../src/index/keys.js'

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex')
const be32 = (n: number) => { const b = Buffer.alloc(4); b.writeUInt32BE(n >>> 0); return b }
function code(fn: () => unknown): string {
  try {
    fn()
  } catch (e) {
    return (e as SnapError).code
  }
  return 'none'
}
/** The error `fn` throws; fails the test if it throws none. */
function thrown(fn: () => unknown): SnapError {
  let err: unknown
  try {
    fn()
  } catch (e) {
    err = e
  }
  if (err === undefined) assert.unreachable('nothing was thrown')
  return err as SnapError
}
async function acode(p: Promise<unknown>): Promise<string> {
  try {
    await p
  } catch (e) {
    return (e as SnapError).code
  }
  return 'none'
}

const uuid = hex('00112233445566778899aabbccddeeff')
const header: ImageHeader = {
  version: 1, headerLength: 192, incompatibleFeatures: 0n, compatibleFeatures: 1n, autoclearFeatures: 0n,
  clusterSize: 1048576, pageSize: 4096, uuid, creationTime: 0x0102030405, generation: 1,
  trailerOffset: 0x3000, trailerLength: 0x123, fileLength: 0x5000, machine: 'pc', baseImageOffset: 0, encryptionMethod: 0,
}

test('header: exact bytes', () => {
  const b = encodeHeader(header)
  assert.is(b.length, 4096)
  const want = Buffer.concat([
    hex('534E41504354 4C1A 00000001 000000C0'),
    hex('0000000000000000 0000000000000001 0000000000000000'),
    hex('00100000 00001000'), uuid,
    hex('0000000102030405 0000000000000001 0000000000003000 0000000000000123 0000000000005000'),
    hex('0002'), Buffer.from('pc'), Buffer.alloc(60),
    hex('0000000000000000 00000000 0000000000000000'),
  ])
  assert.is(want.length, 188)
  assert.equal(b.subarray(0, 188), want)
  assert.is(b.readUInt32BE(188), crc32(want))
  assert.ok(b.subarray(192).every((x) => x === 0))
})

test('header: round trip and checks in order', () => {
  const b = encodeHeader(header)
  assert.equal(decodeHeader(b, 0x5000), header)
  assert.is(code(() => decodeHeader(b, 0x4000)), 'SNAP_TRUNCATED')
  assert.is(code(() => decodeHeader(b, 0x6000)), 'SNAP_CORRUPT')
  assert.is(code(() => decodeHeader(b.subarray(0, 100), 100)), 'SNAP_TRUNCATED')
  assert.is(code(() => decodeHeader(Buffer.alloc(4096), 0x5000)), 'SNAP_INCOMPLETE')
  const bad = (at: number, v: number, fix = true) => {
    const c = Buffer.from(b)
    c[at] ^= v
    if (fix) c.writeUInt32BE(crc32(c.subarray(0, 188)), 188)
    return code(() => decodeHeader(c, 0x5000))
  }
  assert.is(bad(0, 1), 'SNAP_BAD_MAGIC')
  assert.is(bad(11, 3), 'SNAP_UNSUPPORTED_VERSION')
  assert.is(bad(15, 0xff, false), 'SNAP_CORRUPT')
  assert.is(bad(50, 1, false), 'SNAP_CHECKSUM')
  assert.is(bad(23, 4), 'SNAP_UNSUPPORTED_FEATURE')
  assert.is(bad(41, 1), 'SNAP_CORRUPT') // cluster_size not a power of two
  assert.is(bad(105, 0x40), 'SNAP_CORRUPT') // machine_length 66
  assert.is(bad(175, 1), 'SNAP_CORRUPT') // base_image_offset without its bit
})

test('footer: exact bytes, round trip, damage is SNAP_INCOMPLETE', () => {
  const f = { uuid, trailerOffset: 0x3000, trailerLength: 0x123, trailerCrc: 0xdeadbeef, clusterCount: 7, generation: 1 }
  const b = encodeFooter(f)
  const want = Buffer.concat([hex('534E4150454E441A'), uuid, hex('0000000000003000 0000000000000123 DEADBEEF 00000007 0000000000000001 00000000')])
  assert.equal(b.subarray(0, 60), want)
  assert.is(b.readUInt32BE(60), crc32(want))
  assert.equal(decodeFooter(b), f)
  for (const at of [0, 9, 30, 62]) {
    const c = Buffer.from(b)
    c[at] ^= 0x10
    assert.is(code(() => decodeFooter(c)), 'SNAP_INCOMPLETE')
  }
  assert.is(code(() => decodeFooter(b.subarray(0, 63))), 'SNAP_INCOMPLETE')
})

const lim = { pageSize: 4096, maxPages: 256 }
test('cluster header: exact bytes and checks', () => {
  const h = { sequence: 5, codec: 0, flags: 0, pageCount: 2, rawLength: 8192, storedLength: 8192, dataCrc: 0x01020304, pages: Uint32Array.of(0, 7, 1, 0xffff), framePages: 0, frames: new Uint32Array(0) }
  const b = encodeClusterHeader(h)
  assert.is(b.length, 4096)
  const want = hex('534E434C 00000034 00000005 00 00 0000 00000002 00002000 00002000 01020304 00000000 00000007 00000001 0000FFFF')
  assert.equal(b.subarray(0, 48), want)
  assert.is(b.readUInt32BE(48), crc32(want))
  assert.ok(b.subarray(52).every((x) => x === 0))
  assert.equal(decodeClusterHeader(b, 0, { cluster: 5, offset: 4096 }, lim), h)
  const where = { cluster: 5, offset: 4096 }
  const flip = (at: number, fix: boolean, mask = 0x01) => {
    const c = Buffer.from(b)
    c[at] ^= mask
    if (fix) c.writeUInt32BE(crc32(c.subarray(0, 48)), 48)
    return code(() => decodeClusterHeader(c, 0, where, lim))
  }
  assert.is(flip(0, false), 'SNAP_CORRUPT') // magic
  assert.is(flip(7, false), 'SNAP_CORRUPT') // header_length
  assert.is(flip(11, false), 'SNAP_CORRUPT') // sequence
  assert.is(flip(19, false), 'SNAP_CORRUPT') // page_count no longer matches header_length
  assert.is(flip(40, false), 'SNAP_CHECKSUM') // a page entry
  assert.is(flip(12, true, 0x04), 'SNAP_UNSUPPORTED_CODEC')
  assert.is(flip(25, true), 'SNAP_CORRUPT') // stored_length ≠ raw_length for codec 0
  // The error says where: the cluster and the file offset it was read at.
  const damaged = Buffer.from(b)
  damaged[40] ^= 0x01
  const e = thrown(() => decodeClusterHeader(damaged, 0, where, lim))
  assert.is(e.code, 'SNAP_CHECKSUM')
  assert.is(e.context.cluster, 5)
  assert.is(e.context.offset, 4096)
})

test('payload codecs 0 and 1: exact bytes and round trips', async () => {
  const raw = Buffer.alloc(8192, 0x41)
  const where = { cluster: 0, offset: 4096 }
  const h0 = { sequence: 0, codec: 0, flags: 0, pageCount: 2, rawLength: 8192, storedLength: 8192, dataCrc: crc32(raw), pages: Uint32Array.of(0, 0, 0, 1), framePages: 0, frames: new Uint32Array(0) }
  assert.equal(await decodePayload(h0, raw, where), raw)
  const stored = lz4.compressSync(raw)
  // 4-byte little-endian decoded length, then an LZ4 block: one 'A' literal, then a match.
  assert.equal(stored.subarray(0, 4), hex('00200000'))
  const h1 = { ...h0, codec: 1, storedLength: stored.length, dataCrc: crc32(stored) }
  assert.equal(await decodePayload(h1, stored, where), raw)
  // A hand-made codec 1 payload: one literal 'A', a 4090-byte match at offset 1, five literals.
  const handMade = hex(`00100000 1F 41 0100 ${'FF'.repeat(15)} F6 50 4141414141`)
  const h2 = { ...h0, pageCount: 1, rawLength: 4096, storedLength: handMade.length, codec: 1, dataCrc: crc32(handMade) }
  assert.equal(await decodePayload(h2, handMade, where), Buffer.alloc(4096, 0x41))
  const block = Buffer.concat([encodeClusterHeader(h1), stored, Buffer.alloc(4096 - stored.length)])
  const split = splitCluster(block, where, lim)
  assert.equal(split.stored, stored)
  // A prefix that lies about the length is refused before anything is allocated.
  const lying = Buffer.from(stored)
  lying.writeUInt32LE(0x7fffffff, 0)
  assert.is(await acode(decodePayload({ ...h1, dataCrc: crc32(lying) }, lying, where)), 'SNAP_CORRUPT')
  const damaged = Buffer.from(stored)
  damaged[6] ^= 0xff
  assert.is(await acode(decodePayload(h1, damaged, where)), 'SNAP_CHECKSUM')
  assert.is(await acode(decodePayload({ ...h1, dataCrc: crc32(damaged) }, damaged, where)), 'SNAP_CORRUPT')
})

test('framed clusters: exact header bytes, whole and one-frame decodes, every check', async () => {
  const flim = { ...lim, framed: true }
  // Five pages in frames of two: an 'A' frame, a random (stored raw) frame, a one-page 'C' frame.
  const raw = Buffer.concat([Buffer.alloc(8192, 0x41), randomBytes(8192), Buffer.alloc(4096, 0x43)])
  const enc = encodeFrames(raw, 4096, 2, Buffer.alloc(raw.length, 0xee))!
  assert.ok(enc)
  assert.is(enc.frames.length, 6)
  assert.is(enc.frames[2], 8192, 'the incompressible frame is stored raw')
  assert.ok(enc.frames[0] < 8192 && enc.frames[4] < 4096)
  const pages = Uint32Array.of(0, 0, 0, 1, 0, 2, 0, 3, 0, 4)
  const h = { sequence: 0, codec: 1, flags: FLAG_FRAMED, pageCount: 5, rawLength: raw.length, storedLength: enc.stored.length, dataCrc: frameTableCrc(enc.frames), pages, framePages: 2, frames: enc.frames }
  const hb = encodeClusterHeader(h)
  assert.is(hb.readUInt32BE(4), 32 + 8 * 5 + 8 * 3 + 4, 'header_length counts the frame table')
  assert.is(hb.readUInt16BE(14), 2, 'frame_pages in bytes 14-15')
  assert.is(hb.readUInt32BE(32 + 40 + 8), 8192)
  const where = { cluster: 0, offset: 4096 }
  assert.equal(decodeClusterHeader(hb, 0, where, flim), h)
  assert.equal(await decodePayload(h, enc.stored, where), raw)
  assert.equal(decodePayloadSync(h, enc.stored, where, Buffer.alloc(1 << 20)), raw)
  for (let i = 0; i < 3; i++) {
    const x = frameExtent(h, i, 4096)
    assert.equal(decodeFrameSync(h, i, enc.stored.subarray(x.start, x.end), where, Buffer.alloc(65536)), raw.subarray(i * 8192, i * 8192 + x.rawLength))
  }
  const block = Buffer.concat([hb, enc.stored, Buffer.alloc(roundUp(enc.stored.length, 4096) - enc.stored.length)])
  assert.equal(splitCluster(block, where, flim).stored, enc.stored)
  // Framed clusters only where the image header says so; other flag bits never.
  assert.is(code(() => decodeClusterHeader(hb, 0, where, lim)), 'SNAP_CORRUPT')
  const withHeader = (mut: (b: Buffer) => void) => {
    const b = Buffer.from(hb)
    mut(b)
    b.writeUInt32BE(crc32(b.subarray(0, b.readUInt32BE(4) - 4)), b.readUInt32BE(4) - 4)
    return code(() => decodeClusterHeader(b, 0, where, flim))
  }
  assert.is(withHeader((b) => (b[13] = 3)), 'SNAP_CORRUPT')
  assert.is(withHeader((b) => b.writeUInt16BE(0, 14)), 'SNAP_CORRUPT')
  assert.is(withHeader((b) => b.writeUInt16BE(257, 14)), 'SNAP_CORRUPT')
  assert.is(withHeader((b) => b.writeUInt32BE(8193, 32 + 40 + 8)), 'SNAP_CORRUPT', 'a frame longer than its raw length')
  assert.is(withHeader((b) => b.writeUInt32BE(4, 32 + 40)), 'SNAP_CORRUPT', 'a frame of 4 bytes or less')
  assert.is(withHeader((b) => b.writeUInt32BE(h.storedLength + 1, 24)), 'SNAP_CORRUPT', 'frames that do not add up')
  assert.is(withHeader((b) => (b[12] = 0)), 'SNAP_CORRUPT', 'a framed raw cluster')
  // A damaged frame: the whole decode and the one-frame decode both say SNAP_CHECKSUM.
  const damaged = Buffer.from(enc.stored)
  damaged[enc.frames[0] + 100] ^= 1
  assert.is(await acode(decodePayload(h, damaged, where)), 'SNAP_CHECKSUM')
  const x1 = frameExtent(h, 1, 4096)
  assert.is(code(() => decodeFrameSync(h, 1, damaged.subarray(x1.start, x1.end), where, Buffer.alloc(65536))), 'SNAP_CHECKSUM')
  // A frame whose crc matches but whose LZ4 lies: SNAP_CORRUPT, nothing written past the frame.
  const lying = Buffer.from(enc.stored)
  lying.writeUInt32LE(99999, 0)
  const frames = Uint32Array.from(enc.frames)
  frames[1] = crc32(lying.subarray(0, frames[0]))
  const hl = { ...h, frames, dataCrc: frameTableCrc(frames) }
  assert.is(await acode(decodePayload(hl, lying, where)), 'SNAP_CORRUPT')
  // A frame with the right prefix and crc whose LZ4 body is garbage: SNAP_CORRUPT, async and sync.
  const garbage = Buffer.from(enc.stored)
  garbage.fill(0xff, 4, enc.frames[0])
  const gframes = Uint32Array.from(enc.frames)
  gframes[1] = crc32(garbage.subarray(0, gframes[0]))
  const hg = { ...h, frames: gframes, dataCrc: frameTableCrc(gframes) }
  assert.is(await acode(decodePayload(hg, garbage, where)), 'SNAP_CORRUPT')
  assert.is(code(() => decodePayloadSync(hg, garbage, where, Buffer.alloc(1 << 20))), 'SNAP_CORRUPT')
  // A cluster that does not save an eighth is not framed (it is stored raw).
  assert.is(encodeFrames(randomBytes(16384), 4096, 2, Buffer.alloc(16384)), null)
  assert.throws(() => encodeFrames(raw, 4096, 2, Buffer.alloc(raw.length - 1)), RangeError)
})

test('trailer records: exact bytes, alignment, round trip', () => {
  const t = T.encodeTrailer([{ type: 4, body: Buffer.from('abc') }, { type: 5, body: Buffer.alloc(0) }])
  assert.equal(t, hex('00000004 00000000 0000000000000003 616263 0000000000 00000005 00000000 0000000000000000'))
  const recs = [1, 2, 3, 4, 5, 6].map((type) => ({ type, body: Buffer.from([type]) }))
  const m = T.decodeTrailer(T.encodeTrailer(recs))
  assert.equal([...m.keys()], [1, 2, 3, 4, 5, 6])
  assert.is(code(() => T.decodeTrailer(T.encodeTrailer(recs.slice(1)))), 'SNAP_CORRUPT')
  const long = T.encodeTrailer(recs)
  long.writeUInt32BE(0x100, 12)
  assert.is(code(() => T.decodeTrailer(long)), 'SNAP_CORRUPT')
})

test('block_table: exact bytes and limits', () => {
  const blocks = [{ id: 0, name: 'pc.ram', size: 0x200000, pageSize: 4096 }]
  const b = T.encodeBlockTable(blocks)
  assert.equal(b, hex('00000001 00000000 0000000000200000 00001000 06 70632E72616D'))
  assert.equal(T.decodeBlockTable(b, 4096), blocks)
  assert.is(code(() => T.decodeBlockTable(hex('FFFFFFFF'), 4096)), 'SNAP_TOO_LARGE')
  assert.is(code(() => T.decodeBlockTable(hex('00000000'), 4096)), 'SNAP_CORRUPT')
  const c = Buffer.from(b)
  c[19] = 0x07
  assert.is(code(() => T.decodeBlockTable(c, 4096)), 'SNAP_CORRUPT')
  const s = Buffer.from(b)
  s[15] = 0x01 // size not a page multiple
  assert.is(code(() => T.decodeBlockTable(s, 4096)), 'SNAP_CORRUPT')
})

test('page_map: exact bytes, checks, and a huge run_count allocates nothing', () => {
  const blocks = [{ id: 0, name: 'a', size: 16 * 4096, pageSize: 4096 }]
  const runs = [
    { blockId: 0, firstPage: 0, pageCount: 2, cluster: 0, firstSlot: 3 },
    { blockId: 0, firstPage: 4, pageCount: 1, cluster: T.ZERO_CLUSTER, firstSlot: 0 },
  ]
  const b = T.encodePageMap(runs)
  assert.equal(b, hex('00000002 00000000 00000000 00000002 00000000 00000003 00000000 00000004 00000001 FFFFFFFF 00000000'))
  assert.equal(T.decodePageMap(b, blocks, 1, 16), runs)
  assert.is(code(() => T.decodePageMap(hex('FFFFFFFF'), blocks, 1, 16)), 'SNAP_TOO_LARGE')
  assert.is(code(() => T.decodePageMap(b, blocks, 0, 16)), 'SNAP_CORRUPT') // cluster 0 does not exist
  const over = T.encodePageMap([{ blockId: 0, firstPage: 15, pageCount: 2, cluster: T.ZERO_CLUSTER, firstSlot: 0 }])
  assert.is(code(() => T.decodePageMap(over, blocks, 1, 16)), 'SNAP_CORRUPT')
  const unsorted = T.encodePageMap([runs[1], runs[0]])
  assert.is(code(() => T.decodePageMap(unsorted, blocks, 1, 16)), 'SNAP_CORRUPT')
})

test('cluster_directory and stream_info round trips', () => {
  const d = T.encodeClusterDirectory([4096, 0x100002000])
  assert.equal(d, hex('00000002 0000000000001000 0000000100002000'))
  assert.equal(T.decodeClusterDirectory(d), [4096, 0x100002000])
  assert.is(code(() => T.decodeClusterDirectory(hex('00010000'))), 'SNAP_TOO_LARGE')
  const info: T.StreamInfo = { v: 1, ramSectionId: 2, ramInstanceId: 0, ramVersion: 4, switchoverStart: true, ramEnd: true, source: 'libvirt', libvirtHeader: Buffer.from('hdr'), creator: 'x', counters: { pages: 3 } }
  assert.equal(T.decodeStreamInfo(T.encodeStreamInfo(info)), info)
  assert.is(code(() => T.decodeStreamInfo(hex('c1'))), 'SNAP_CORRUPT')
  assert.is(code(() => T.decodeStreamInfo(hex('93010203'))), 'SNAP_CORRUPT')
})

test('page map in memory: runs merge, round trip, dead bytes', () => {
  const m = new PageMap([8, 4])
  m.setData(0, 0, 0, 0)
  m.setData(0, 1, 0, 1)
  m.setData(0, 2, 1, 0)
  m.setZero(0, 3)
  m.setZero(0, 4)
  m.setData(1, 3, 0, 2)
  const runs = m.toRuns()
  assert.equal(runs, [
    { blockId: 0, firstPage: 0, pageCount: 2, cluster: 0, firstSlot: 0 },
    { blockId: 0, firstPage: 2, pageCount: 1, cluster: 1, firstSlot: 0 },
    { blockId: 0, firstPage: 3, pageCount: 2, cluster: T.ZERO_CLUSTER, firstSlot: 0 },
    { blockId: 1, firstPage: 3, pageCount: 1, cluster: 0, firstSlot: 2 },
  ])
  assert.equal(PageMap.fromRuns([8, 4], runs).toRuns(), runs)
  m.setData(0, 0, 1, 1) // re-sent: slot 0 of cluster 0 is now dead
  assert.is(m.liveCount(0), 2)
  assert.is(m.deadBytes([3, 2], [3000, 100]), 1000)
  const big = new PageMap([1 << 20])
  assert.is(big.loc[0].byteLength + big.slot[0].byteLength, 6 << 20)
})

test('index keys and values: exact bytes, order, round trips', () => {
  assert.equal(K.META_KEY, hex('006D657461'))
  const rk = K.runKey(3, 0x1_0000_1000)
  assert.equal(rk, hex('01 00000003 0000000100001000'))
  assert.equal(K.decodeRunKey(rk), { blockId: 3, byteOffset: 0x100001000 })
  assert.ok(Buffer.compare(K.runKey(1, 4096 * 255), K.runKey(1, 4096 * 256)) < 0)
  assert.ok(Buffer.compare(K.runKey(1, 2 ** 40), K.runKey(2, 0)) < 0)
  const rv = { kind: K.KIND_DATA as 2, pageCount: 5, cluster: 9, firstSlot: 2 }
  assert.equal(K.encodeRunValue(rv), hex('01 02 00000005 00000009 00000002'))
  assert.equal(K.decodeRunValue(K.encodeRunValue(rv)), rv)
  assert.equal(K.clusterKey(258), hex('02 00000102'))
  const cv = { offset: 8192, storedLength: 4100, codec: 1, pageCount: 16 }
  assert.equal(K.encodeClusterValue(cv), hex('01 0000000000002000 00001004 01 00000010'))
  assert.equal(K.decodeClusterValue(K.encodeClusterValue(cv)), cv)
  assert.equal(K.nameKey('pc.ram'), hex('03 70632E72616D'))
  assert.equal(K.encodeNameValue(2), hex('01 00000002'))
  assert.is(K.decodeNameValue(hex('01 00000002')), 2)
  const meta = { uuid, generation: 1, fileLength: 8192, trailerCrc: 5, runs: 2, clusters: 1, blocks: 1 }
  assert.equal(K.decodeMeta(K.encodeMeta(meta)), meta)
  assert.is(K.encodeMeta(meta)[0], 1)
  assert.is(code(() => K.decodeRunValue(hex('02 02 00000005 00000009 00000002'))), 'SNAP_INDEX_CORRUPT')
  assert.is(code(() => K.decodeMeta(hex('01c1'))), 'SNAP_INDEX_CORRUPT')
  void be32
})

test.run()
