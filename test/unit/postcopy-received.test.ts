// The received bitmap of postcopy recovery, checked against the image's block and applied
// (src/postcopy/received.ts): QEMU's size rule, bits past the end, hugepages whole or not at all.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { isSnapError } from '../../src/errors.js'
import { applyReceivedBitmap, receivedBitmapBytes } from '../../src/postcopy/received.js'

const PAGE = 4096
const block = (pages: number) => ({ id: 0, name: 'mem', size: pages * PAGE, pageSize: PAGE })

function refused(pages: number, hostPages: number, bitmap: Buffer, why: RegExp): void {
  try {
    applyReceivedBitmap(block(pages), hostPages, bitmap, new Uint8Array(pages))
    assert.unreachable('accepted')
  } catch (err) {
    assert.ok(isSnapError(err, 'SNAP_RECV_BITMAP'), String(err))
    assert.match((err as Error).message, why)
  }
}

test('size: one bit per page in whole 8-byte words', () => {
  assert.is(receivedBitmapBytes(0), 0)
  assert.is(receivedBitmapBytes(1), 8)
  assert.is(receivedBitmapBytes(64), 8)
  assert.is(receivedBitmapBytes(65), 16)
  assert.is(receivedBitmapBytes(65536), 8192)
})

test('bits mark pages sent, LE bit order; the count is returned', () => {
  const sent = new Uint8Array(70)
  const m = Buffer.alloc(16)
  m[0] = 0b1000_0001 // pages 0 and 7
  m[8] = 0b0010_0000 // page 69
  assert.is(applyReceivedBitmap(block(70), 1, m, sent), 3)
  assert.equal([...sent.keys()].filter((p) => sent[p]), [0, 7, 69])
})

test('refused: another size, a bit past the end, a hugepage partly received', () => {
  refused(70, 1, Buffer.alloc(8), /8 bytes, where its 70 pages take 16/)
  refused(70, 1, Buffer.alloc(24), /24 bytes/)
  const past = Buffer.alloc(16)
  past[8] = 0b0100_0000 // page 70 of 70
  refused(70, 1, past, /page 70 is marked received/)
  const half = Buffer.alloc(8)
  half[0] = 0b0000_0111 // 3 of the 4 pages of host page 0
  refused(8, 4, half, /partly received \(3 of 4/)
  const whole = Buffer.alloc(8)
  whole[0] = 0b1111_0000
  assert.is(applyReceivedBitmap(block(8), 4, whole, new Uint8Array(8)), 4)
})

test.run()
