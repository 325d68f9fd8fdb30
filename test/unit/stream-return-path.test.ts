import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { isSnapError } from '../../src/errors.js'
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

function rpError(bytes: Buffer, atEnd = false): void {
  const p = new ReturnPathParser()
  try {
    p.push(bytes)
    if (atEnd) p.end()
    assert.unreachable(`parsed ${bytes.toString('hex')}`)
  } catch (err) {
    assert.ok(isSnapError(err, 'SNAP_RETURN_PATH'), String(err))
  }
  // a failed parser stays failed
  try {
    p.push(Buffer.alloc(0))
    assert.unreachable('pushed after the error')
  } catch (err) {
    assert.ok(isSnapError(err, 'SNAP_RETURN_PATH'))
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
  rpError(h('0005 0008 07 70632e62696f73'))
  rpError(h('0000 0000'))
  rpError(h('0008 0000'))
  rpError(h('0004 000c ffffffffffffffff 00001000'))
  rpError(h('0002 0004 0000'), true)
  rpError(h('00'), true)
})

test.run()
