import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { isSnapError, type ErrorCode } from '../../src/errors.js'
import { ReturnPathParser, encodeRpMessage, type RpMessage } from '../../src/stream/return-path.js'

const h = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex')

// The return path of a real QEMU 10 postcopy run (reference §5.3).
const REAL = h(
  '0002 0004 00000001' +
  '0003 0014 000000000003f000 00001000 07 70632e62696f73' +
  '0004 000c 000000000003e000 00001000' +
  '0007 0000' +
  '0006 0004 00000001' +
  '0001 0004 00000000',
)
const MESSAGES: RpMessage[] = [
  { type: 'pong', value: 1 },
  { type: 'req', block: 'pc.bios', offset: 0x3f000, length: 0x1000 },
  { type: 'req', block: null, offset: 0x3e000, length: 0x1000 },
  { type: 'switchover-ack' },
  { type: 'resume-ack', value: 1 },
  { type: 'shut', status: 0 },
]

function parseIn(bytes: Buffer, piece: number): RpMessage[] {
  const p = new ReturnPathParser()
  const out: RpMessage[] = []
  if (piece === 0) out.push(...p.push(bytes))
  else for (let i = 0; i < bytes.length; i += piece) out.push(...p.push(bytes.subarray(i, i + piece)))
  p.end()
  return out
}

test('parse whole and in pieces', () => {
  for (const piece of [0, 1, 3, 7, 4093]) assert.equal(parseIn(REAL, piece), MESSAGES, `pieces of ${piece}`)
})

test('encodeRpMessage gives the exact bytes', () => {
  assert.ok(Buffer.concat(MESSAGES.map(encodeRpMessage)).equals(REAL))
  assert.is(encodeRpMessage({ type: 'pong', value: 1 }).toString('hex'), '0002000400000001')
  assert.is(encodeRpMessage({ type: 'shut', status: 0 }).toString('hex'), '0001000400000000')
})

function rpError(bytes: Buffer, atEnd = false, code: ErrorCode = 'SNAP_RETURN_PATH', maxBitmapBytes?: number): void {
  const p = new ReturnPathParser(maxBitmapBytes)
  try {
    p.push(bytes)
    if (atEnd) p.end()
    assert.unreachable(`parsed ${bytes.toString('hex')}`)
  } catch (err) {
    assert.ok(isSnapError(err, code), String(err))
  }
  // a failed parser stays failed
  try {
    p.push(Buffer.alloc(0))
    assert.unreachable('pushed after the error')
  } catch (err) {
    assert.ok(isSnapError(err, code))
  }
}

test('errors: lengths other than the spec, payloads > 512, RECV_BITMAP, unknown types, cut messages', () => {
  rpError(h('0001 0003 000000'))
  rpError(h('0002 0005 0000000100'))
  rpError(h('0004 000d 000000000003e000 00001000 00'))
  rpError(h('0007 0001 00'))
  rpError(h('0003 0014 000000000003f000 00001000 08 70632e62696f73')) // name length disagrees
  rpError(h('0003 000d 000000000003f000 00001000 00'))
  rpError(Buffer.concat([h('0003 0201'), Buffer.alloc(513)]))
  rpError(h('0003 ffff')) // refused from the header alone
  rpError(h('0005 0007 07 70632e62696f73 0000000000000000')) // RECV_BITMAP whose name overruns its length
  rpError(h('0005 0001 00 0000000000000000'))
  rpError(h('0000 0000'))
  rpError(h('0008 0000'))
  rpError(h('0004 000c ffffffffffffffff 00001000'))
  rpError(h('0002 0004 0000'), true)
  rpError(h('00'), true)
})

// RECV_BITMAP: name in the message, then size, bitmap and end marker outside its length (QEMU
// ramblock_recv_bitmap_send): 3 words of bitmap for block "mem", then a PONG right after it.
const BITMAP = h('0005 0004 03 6d656d  0000000000000018' + '0f00000000000080 0000000000000000 0100000000000000' + '0123456789abcdef' + '0002 0004 00000007')

test('RECV_BITMAP: exact bytes, whole and in pieces, what follows it parsed too', () => {
  const bitmap = h('0f00000000000080 0000000000000000 0100000000000000')
  const want: RpMessage[] = [{ type: 'recv-bitmap', block: 'mem', bitmap }, { type: 'pong', value: 7 }]
  for (const piece of [0, 1, 3, 7, 13, 4093]) assert.equal(parseIn(BITMAP, piece), want, `pieces of ${piece}`)
  assert.ok(Buffer.concat(want.map(encodeRpMessage)).equals(BITMAP))
  // two in a row, and an empty bitmap (a block of no pages)
  const two = Buffer.concat([encodeRpMessage(want[0]), encodeRpMessage({ type: 'recv-bitmap', block: 'x', bitmap: Buffer.alloc(0) })])
  assert.equal(parseIn(two, 5), [want[0], { type: 'recv-bitmap', block: 'x', bitmap: Buffer.alloc(0) }])
})

const bitmapError = (bytes: Buffer, atEnd = false, max?: number): void => rpError(bytes, atEnd, 'SNAP_RECV_BITMAP', max)

test('RECV_BITMAP errors: end marker, size not whole words, oversized, cut short; random bytes never crash', () => {
  const bad = Buffer.from(BITMAP)
  bad[4 + 4 + 8 + 24] ^= 0xff // the end marker
  bitmapError(bad)
  bitmapError(h('0005 0004 03 6d656d 0000000000000005 0000000000'))
  bitmapError(h('0005 0004 03 6d656d 0000000000000400'), false, 512)
  bitmapError(h('0005 0004 03 6d656d ffffffffffffff00'))
  bitmapError(BITMAP.subarray(0, 30), true)
  bitmapError(BITMAP.subarray(0, 4 + 4 + 8 + 24 + 7), true)
  // a size that is right for a bigger block reads the next bytes as the end marker
  bitmapError(Buffer.concat([h('0005 0004 03 6d656d 0000000000000020'), BITMAP.subarray(16)]))
  let seed = 7
  const rnd = (): number => (seed = (seed * 1103515245 + 12345) >>> 0) >>> 16
  for (let i = 0; i < 2000; i++) {
    const b = Buffer.from(BITMAP)
    for (let k = 1 + (rnd() % 4); k > 0; k--) b[rnd() % b.length] = rnd() & 255
    const cut = b.subarray(0, rnd() % (b.length + 1))
    try {
      parseIn(cut, 1 + (rnd() % 9))
    } catch (err) {
      assert.ok(isSnapError(err, 'SNAP_RETURN_PATH') || isSnapError(err, 'SNAP_RECV_BITMAP'), String(err))
    }
  }
})

test.run()
