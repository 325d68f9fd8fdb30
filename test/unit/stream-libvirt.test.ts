import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { isSnapError } from '../../src/errors.js'
import { libvirtHeaderLength, makeLibvirtHeader, parseLibvirtHeader } from '../../src/stream/libvirt.js'

const XML = '<domain type="kvm"><name>vm1</name></domain>'

function code(fn: () => unknown): string {
  try {
    fn()
  } catch (err) {
    if (isSnapError(err)) return err.code
    throw err
  }
  return 'no error'
}

test('exact bytes of a header, and parse back', () => {
  const h = makeLibvirtHeader(XML, { wasRunning: true, padding: 10 })
  assert.is(h.subarray(0, 16).toString('latin1'), 'LibvirtQemudSave')
  assert.is(h.subarray(16, 36).toString('hex'), '02000000' + '37000000' + '01000000' + '00000000' + '00000000')
  assert.ok(h.subarray(36, 92).every((b) => b === 0))
  assert.is(h.length, 92 + XML.length + 1 + 10)
  const stream = Buffer.from('QEVM')
  const p = parseLibvirtHeader(Buffer.concat([h, stream]))!
  assert.is(p.streamOffset, 92 + 0x37)
  assert.is(p.wasRunning, true)
  assert.is(p.format, 0)
  assert.is(p.version, 2)
  assert.is(p.xml, XML)
  assert.is(p.cookie, null)
  assert.ok(p.header.equals(h))
  assert.is(libvirtHeaderLength(h.subarray(0, 92)), p.streamOffset)
})

test('cookie, byte-swapped (big-endian host) header, version 1', () => {
  const h = makeLibvirtHeader(XML, { cookie: '<qemu-migration/>', padding: 3, bigEndian: true })
  const p = parseLibvirtHeader(h)!
  assert.is(p.xml, XML)
  assert.is(p.cookie, '<qemu-migration/>')
  assert.is(p.wasRunning, false)
  assert.is(p.streamOffset, h.length)
  const v1 = parseLibvirtHeader(makeLibvirtHeader(XML, { version: 1, format: 1 }))!
  assert.is(v1.version, 1)
  assert.is(v1.format, 0, 'version 1 images were never compressed')
})

test('not libvirt: null', () => {
  assert.is(parseLibvirtHeader(Buffer.from('QEVM\0\0\0\x03')), null)
  assert.is(libvirtHeaderLength(Buffer.from('QEVM')), null)
  assert.is(parseLibvirtHeader(Buffer.alloc(200)), null)
})

test('refusals: incomplete save, compressed or sparse formats, bad lengths', () => {
  assert.is(code(() => parseLibvirtHeader(makeLibvirtHeader(XML, { partial: true }))), 'SNAP_LIBVIRT_INCOMPLETE')
  try {
    parseLibvirtHeader(makeLibvirtHeader(XML, { format: 1 }))
    assert.unreachable()
  } catch (err) {
    assert.ok(isSnapError(err, 'SNAP_STREAM_UNSUPPORTED'))
    assert.match((err as Error).message, /gzip-compressed libvirt save image: decompress it first/)
  }
  for (const f of [2, 3, 4, 5, 6, 7]) {
    assert.is(code(() => parseLibvirtHeader(makeLibvirtHeader(XML, { format: f }))), 'SNAP_STREAM_UNSUPPORTED', `format ${f}`)
  }
  const h = makeLibvirtHeader(XML)
  assert.is(code(() => parseLibvirtHeader(h.subarray(0, 50))), 'SNAP_STREAM_TRUNCATED')
  assert.is(code(() => parseLibvirtHeader(h.subarray(0, 100))), 'SNAP_STREAM_TRUNCATED')
  const huge = Buffer.from(h)
  huge.writeUInt32LE(0xffffffff, 20)
  assert.is(code(() => libvirtHeaderLength(huge)), 'SNAP_STREAM_TOO_LARGE')
  const zero = Buffer.from(h)
  zero.writeUInt32LE(0, 20)
  assert.is(code(() => parseLibvirtHeader(zero)), 'SNAP_STREAM_CORRUPT')
  const v9 = Buffer.from(h)
  v9.writeUInt32LE(0x09000009, 16)
  assert.is(code(() => parseLibvirtHeader(v9)), 'SNAP_STREAM_UNSUPPORTED')
  const cookie = Buffer.from(h)
  cookie.writeUInt32LE(5000, 32)
  assert.is(code(() => parseLibvirtHeader(cookie)), 'SNAP_STREAM_CORRUPT')
})

test.run()
