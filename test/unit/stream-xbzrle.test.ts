import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { isSnapError } from '../../src/errors.js'
import { xbzrleDecode, xbzrleEncode } from '../../src/stream/xbzrle.js'
import { pageOf } from './stream-helpers.js'

function roundTrip(oldPage: Buffer, newPage: Buffer): Buffer | null {
  const enc = xbzrleEncode(oldPage, newPage)
  if (enc === null || enc.length === 0) return enc
  const dst = Buffer.from(oldPage)
  xbzrleDecode(enc, dst)
  assert.ok(dst.equals(newPage), 'decoded page equals the new page')
  return enc
}

test('round trips: small edits, runs of every length, edits at both ends', () => {
  const base = pageOf(1)
  for (const [from, to] of [[0, 1], [0, 127], [0, 128], [5, 300], [4095, 4096], [1000, 3000], [0, 4096 - 3]]) {
    const n = Buffer.from(base)
    for (let i = from; i < to; i++) n[i] ^= 0x55
    const enc = roundTrip(base, n)
    assert.ok(enc && enc.length > 0 && enc.length <= 4096, `edit ${from}..${to}`)
  }
  // many scattered one-byte edits: every other 7th byte
  const n = Buffer.from(base)
  for (let i = 3; i < 4096; i += 7) n[i] ^= 1
  roundTrip(base, n)
})

test('exact bytes: first zrun may be 0; counts >= 128 take two bytes; trailing run omitted', () => {
  const a = Buffer.alloc(4096)
  const b = Buffer.from(a)
  b[0] = 1
  b[200] = 2
  b[201] = 3
  assert.is(xbzrleEncode(a, b)!.toString('hex'), '00' + '01' + '01' + 'c701' + '02' + '0203')
})

test('equal pages encode to nothing; incompressible pages give null', () => {
  assert.is(xbzrleEncode(pageOf(1), pageOf(1))!.length, 0)
  assert.is(xbzrleEncode(pageOf(1), pageOf(2)), null)
  // alternating changed/unchanged bytes: 2 bytes of counts per changed byte -> too long
  const a = Buffer.alloc(4096)
  const b = Buffer.from(a)
  for (let i = 0; i < 4096; i += 2) b[i] = 1
  assert.is(xbzrleEncode(a, b), null)
})

const bad = (bytes: number[], label: string) => {
  try {
    xbzrleDecode(Uint8Array.from(bytes), new Uint8Array(4096))
    assert.unreachable(`${label}: decoded`)
  } catch (err) {
    assert.ok(isSnapError(err, 'SNAP_STREAM_CORRUPT'), `${label}: ${String(err)}`)
  }
}

test('decode rules (reference §2.5): every violation is SNAP_STREAM_CORRUPT', () => {
  bad([0], 'one byte left before a zero-run count')
  bad([0, 1], 'one byte left before a literal count')
  bad([0, 0, 0], 'empty literal run')
  bad([0, 1, 7, 0, 1, 7], 'a later zero run of 0')
  bad([0, 3, 1, 2], 'literals past the end of the data')
  bad([0x80, 0x80, 1, 1], 'three-byte count')
  bad([0, 0x81, 0x80, 1], 'three-byte literal count')
  bad([0x80, 0x20, 1, 1], 'zero run to 4096 then a literal past the page') // 0x1000
  bad([0x81, 0x20, 1, 1], 'zero run past the page')
  bad([0xff, 0x1f, 2, 1, 1], 'literal run past the page') // zrun 4095, 2 literals
  bad([0, 2, 1], 'literal count with one byte after it')
})

test('decode applies against the current page contents', () => {
  const page = Buffer.alloc(16, 0xaa)
  xbzrleDecode(Uint8Array.from([2, 1, 0x11, 3, 2, 0x22, 0x33]), page)
  assert.is(page.toString('hex'), 'aaaa11aaaaaa2233' + 'aa'.repeat(8))
  const full = Buffer.alloc(16)
  xbzrleDecode(Uint8Array.from([15, 1, 9]), full) // a literal reaching exactly the end
  assert.is(full[15], 9)
  // non-minimal two-byte counts are accepted, as by QEMU
  const p2 = Buffer.alloc(16)
  xbzrleDecode(Uint8Array.from([0x81, 0x00, 1, 5]), p2)
  assert.is(p2[1], 5)
})

test.run()
