// The LZ4 block decoders that write into a reused buffer (src/container/lz4-block.ts: liblz4
// through native/lz4, and the JavaScript one used without it): every kind of block lz4-napi
// writes decodes byte for byte as lz4-napi decodes it, into a buffer with old bytes in it, and
// lying blocks throw Lz4Error (SNAP_CORRUPT through cluster.ts) without writing past raw_length.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { crc32 as zlibCrc32 } from 'node:zlib'
import { crc32 } from '../../src/container/crc.js'
import { randomBytes } from 'node:crypto'
import lz4 from 'lz4-napi'
import { Lz4Error, compressLz4Into, decodeLz4Block, decodeLz4BlockJs, lz4Decoder, nativeLz4 } from '../../src/container/lz4-block.js'
import { CODEC_LZ4, decodePayloadSync, type ClusterHeader } from '../../src/container/cluster.js'
import type { SnapError } from '../../src/errors.js'

function samples(): Buffer[] {
  const text = Buffer.from('the quick brown fox jumps over the lazy dog; '.repeat(2000)).subarray(0, 65536)
  const period = (p: number) => Buffer.from(Array.from({ length: 65536 }, (_, i) => (i % p) * 37 & 255))
  const mixed = Buffer.concat([randomBytes(20000), Buffer.alloc(30000), text.subarray(0, 9000), period(3).subarray(0, 6536)])
  return [Buffer.alloc(65536), randomBytes(65536), text, period(1), period(2), period(7), period(100), period(5000), mixed, Buffer.from('a'), Buffer.alloc(0)]
}

for (const [name, decode] of [['liblz4', decodeLz4Block], ['javascript', decodeLz4BlockJs]] as const) {
test(`${name}: decodes what lz4-napi compresses, into a dirty reused buffer`, () => {
  const out = Buffer.alloc(1 << 17, 0xaa)
  for (const raw of samples()) {
    const c = lz4.compressSync(raw)
    assert.is(c.readUInt32LE(0), raw.length)
    out.fill(0xaa)
    assert.is(decode(c, 4, c.length, out, raw.length), raw.length)
    assert.ok(out.subarray(0, raw.length).equals(raw))
    assert.is(out[raw.length], 0xaa, 'nothing written past raw_length')
  }
})

test(`${name}: a block that lies throws Lz4Error`, () => {
  const raw = samples()[8]
  const c = lz4.compressSync(raw)
  const out = Buffer.alloc(raw.length + 4096)
  const throws = (src: Buffer, n = raw.length) => assert.throws(() => decode(src, 4, src.length, out, n), (e: unknown) => e instanceof Lz4Error)
  throws(c.subarray(0, c.length - 1)) // cut short
  throws(c, raw.length - 1) // raw_length too small
  throws(c, raw.length + 1) // raw_length too large
  throws(Buffer.from([0, 0, 0, 0, 0x0f, 0x05, 0x00])) // a match before any output
  throws(Buffer.from([0, 0, 0, 0, 0x1f, 0x41, 0x00, 0x00]), 1 + 19) // offset 0
  throws(Buffer.from([0, 0, 0, 0, 0xf0, 0xff]), 300) // literal length runs off the end
  for (let i = 0; i < 2000; i++) {
    const bad = Buffer.from(c)
    bad[4 + ((i * 7919) % (c.length - 4))] ^= 1 << (i % 8)
    try {
      decode(bad, 4, bad.length, out, raw.length)
    } catch (e) {
      assert.ok(e instanceof Lz4Error)
    }
  }
})
}

test('the addon is built and decodeLz4Block uses it (`npm run build` builds it)', () => {
  assert.ok(nativeLz4(), 'native/lz4 is not built: `npm run build` (tools/build-native.sh) builds it')
  assert.match(lz4Decoder(), /^liblz4 1\.\d+\.\d+$/)
})

test('compressLz4Into writes codec 1 (length prefix, block) that lz4-napi decodes; 0 when it does not fit', () => {
  const out = Buffer.alloc(1 << 17)
  for (const raw of samples().filter((b) => b.length > 0)) {
    out.fill(0xee)
    const n = compressLz4Into(raw, out)
    assert.ok(n > 4)
    assert.is(out.readUInt32LE(0), raw.length)
    assert.ok(lz4.uncompressSync(out.subarray(0, n)).equals(raw))
    assert.is(out[n], 0xee, 'nothing written past what it returns')
    assert.is(compressLz4Into(raw, out.subarray(0, 4)), 0)
  }
  const random = randomBytes(65536)
  assert.is(compressLz4Into(random, out.subarray(0, random.length - 1)), 0, 'random bytes do not fit in less than their length')
})

test('crc32 (native/lz4, PCLMULQDQ folding) is zlib.crc32: every length to 600 at 17 offsets, and long random runs', () => {
  const big = randomBytes(1 << 20)
  for (let len = 0; len < 600; len++) {
    for (let off = 0; off < 17; off++) {
      const b = big.subarray(off, off + len)
      assert.is(crc32(b), zlibCrc32(b), `length ${len} at offset ${off}`)
    }
  }
  for (let i = 0; i < 200; i++) {
    const off = (i * 7919) % 4096
    const b = big.subarray(off, off + ((i * 104729) % (big.length - off)))
    assert.is(crc32(b), zlibCrc32(b), `length ${b.length} at offset ${off}`)
  }
  assert.is(crc32(Buffer.alloc(1 << 17)), zlibCrc32(Buffer.alloc(1 << 17)))
})

test('liblz4 and the JavaScript decoder agree on damaged blocks: what liblz4 accepts, the JavaScript one decodes the same', () => {
  const raw = Buffer.concat(samples().slice(1, 9)).subarray(0, 131072)
  const c = lz4.compressSync(raw)
  const a = Buffer.alloc(raw.length)
  const b = Buffer.alloc(raw.length)
  let accepted = 0
  for (let i = 0; i < 3000; i++) {
    const bad = Buffer.from(c)
    for (let k = 0; k <= i % 3; k++) bad[4 + ((i * 7919 + k * 104729) % (c.length - 4))] ^= 1 << ((i + k) % 8)
    let n = -1
    try {
      n = decodeLz4Block(bad, 4, bad.length, a, raw.length)
    } catch (e) {
      assert.ok(e instanceof Lz4Error)
      continue
    }
    accepted++
    assert.is(decodeLz4BlockJs(bad, 4, bad.length, b, raw.length), n)
    assert.ok(a.equals(b), `case ${i}: the decoders differ`)
  }
  assert.ok(accepted > 0, 'some damage leaves a valid block (literal bytes): both decode it alike')
})

test('decodePayloadSync into a buffer: the same bytes as without, SNAP_CORRUPT for a bad block', () => {
  const raw = Buffer.concat([samples()[8], samples()[2]]).subarray(0, 4096 * 24)
  const stored = lz4.compressSync(raw)
  const h: ClusterHeader = { sequence: 0, codec: CODEC_LZ4, flags: 0, pageCount: 24, rawLength: raw.length, storedLength: stored.length, dataCrc: crc32(stored), pages: new Uint32Array(48), framePages: 0, frames: new Uint32Array(0) }
  const where = { cluster: 0, offset: 4096 }
  const into = Buffer.alloc(1 << 20)
  assert.ok(decodePayloadSync(h, stored, where, into).equals(raw))
  assert.ok(decodePayloadSync(h, stored, where).equals(raw))
  const bad = stored.subarray(0, stored.length - 1) // its last literal cut off, checksum right
  const hb = { ...h, storedLength: bad.length, dataCrc: crc32(bad) }
  let code = 'none'
  try {
    decodePayloadSync(hb, bad, where, into)
  } catch (e) {
    code = (e as SnapError).code
  }
  assert.is(code, 'SNAP_CORRUPT')
})

test.run()
