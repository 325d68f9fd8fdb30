// The device tail is accepted whenever QEMU would accept it: legacy sections described only by
// their size (slirp), sections the description gets wrong (custom put), and streams without a
// description are checked by header/footer chaining; cut or garbled tails are still refused.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { checkDeviceTail, describeDeviceCheck } from '../../src/stream/device-tail.js'
import { SnapError } from '../../src/errors.js'
import { deviceTail, parseAll, synthStream, u32 } from './stream-helpers.js'

const full = (sid: number, name: string, instance: number, version: number, body: Buffer): Buffer =>
  Buffer.concat([Buffer.from([0x04]), u32(sid), Buffer.from([name.length]), Buffer.from(name), u32(instance), u32(version), body, Buffer.from([0x7e]), u32(sid)])

function withDesc(sections: Buffer, devices: unknown[] | undefined): Buffer {
  const json = Buffer.from(JSON.stringify(devices === undefined ? { page_size: 4096 } : { page_size: 4096, devices }))
  return Buffer.concat([sections, Buffer.from([0x00, 0x06]), u32(json.length), json])
}

// A legacy handler as QEMU 10 describes slirp: a top-level size, one buffer field, no version.
const slirpBody = Buffer.from('slirp state: any bytes, even \x7e\x00\x00\x00\x02 inside')
const slirp = full(2, 'slirp', 0, 4, slirpBody)
const slirpDesc = { name: 'slirp', instance_id: 0, size: slirpBody.length, fields: [{ name: 'data', size: slirpBody.length, type: 'buffer' }] }
const gsBody = Buffer.alloc(36)
const gs = full(3, 'globalstate', 0, 1, gsBody)
const gsDesc = { name: 'globalstate', instance_id: 0, vmsd_name: 'globalstate', version: 1, fields: [{ name: 'state', type: 'buffer', size: 36 }] }

const check = (tail: Buffer) => checkDeviceTail(tail, 0)
const codeOf = (f: () => unknown): string | undefined => {
  try {
    f()
  } catch (e) {
    assert.instance(e, SnapError)
    return (e as SnapError).code
  }
  return undefined
}

test('a legacy section described by its size only (slirp) is walked, not refused', () => {
  const tail = withDesc(Buffer.concat([slirp, gs]), [slirpDesc, gsDesc])
  const l = check(tail)
  assert.is(l.eof, slirp.length + gs.length)
  assert.equal(l.sections.map((s) => [s.name, s.version, s.how]), [['slirp', 4, 'walked'], ['globalstate', 1, 'walked']])
  // and through the whole parser, whatever the chunking
  const s = synthStream({ parts: [], tail: { deviceSections: Buffer.concat([slirp, gs]), streamEnd: tail.subarray(l.eof) } })
  const o = parseAll(s)
  assert.not.ok(o.error, o.error?.message)
  assert.ok(o.state!.deviceSections.equals(Buffer.concat([slirp, gs])))
})

test('a section the description gets wrong is taken on trust by its footer, bytes unchanged', () => {
  // custom put: the description says 8 bytes, the section holds 13
  const odd = full(2, 'virtio-net', 0, 11, Buffer.from('13 bytes here'))
  const oddDesc = { name: 'virtio-net', instance_id: 0, vmsd_name: 'virtio-net', version: 11, fields: [{ name: 'vdev', type: 'virtio', size: 8 }] }
  const tail = withDesc(Buffer.concat([odd, gs]), [oddDesc, gsDesc])
  const l = check(tail)
  assert.equal(l.sections.map((s) => [s.name, s.how]), [['virtio-net', 'chained'], ['globalstate', 'walked']])
  assert.equal(describeDeviceCheck(tail.subarray(0, l.eof), tail.subarray(l.eof)), {
    description: true, sections: 2, walked: 1, trusted: ['virtio-net/0'],
  })
})

test('a description without a device list: every section chained; one naming other devices: refused', () => {
  for (const devices of [undefined, [1, 2]]) {
    const l = check(withDesc(Buffer.concat([slirp, gs]), devices as unknown[]))
    assert.equal(l.sections.map((s) => [s.name, s.how]), [['slirp', 'chained'], ['globalstate', 'chained']], JSON.stringify(devices))
  }
  for (const devices of [[gsDesc, slirpDesc], [{ name: 'slirp', instance_id: 0 }], [slirpDesc], [slirpDesc, gsDesc, gsDesc]]) {
    assert.is(codeOf(() => check(withDesc(Buffer.concat([slirp, gs]), devices))), 'SNAP_STREAM_CORRUPT', JSON.stringify(devices))
  }
})

test('no description: sections chained up to a lone EOF', () => {
  const l = check(Buffer.concat([slirp, gs, Buffer.from([0])]))
  assert.is(l.vmdesc, false)
  assert.is(l.sections.length, 2)
  const t = deviceTail({ vmdesc: false })
  assert.is(check(Buffer.concat([t.deviceSections, t.streamEnd])).sections.length, 2)
})

test('cut, lengthened, misfooted or garbled tails are still refused', () => {
  const good = Buffer.concat([slirp, gs])
  const desc = [slirpDesc, gsDesc]
  const badFooter = Buffer.from(good)
  badFooter[badFooter.length - 1] ^= 1
  assert.is(codeOf(() => check(withDesc(badFooter, desc))), 'SNAP_STREAM_CORRUPT')
  assert.is(codeOf(() => check(withDesc(Buffer.concat([good, Buffer.from([0x04])]), desc))), 'SNAP_STREAM_CORRUPT')
  assert.is(codeOf(() => check(withDesc(good.subarray(0, good.length - 1), desc))), 'SNAP_STREAM_CORRUPT')
  assert.is(codeOf(() => check(withDesc(good.subarray(0, slirp.length + 3), desc))), 'SNAP_STREAM_CORRUPT')
  assert.is(codeOf(() => check(Buffer.concat([good.subarray(0, good.length - 7), Buffer.from([0])]))), 'SNAP_STREAM_TRUNCATED')
  assert.is(codeOf(() => check(good)), 'SNAP_STREAM_TRUNCATED')
  const garbled = Buffer.from(good)
  garbled[slirp.length + 6] = 0x01 // a control byte in the second header's name
  assert.is(codeOf(() => check(withDesc(garbled, desc))), 'SNAP_STREAM_CORRUPT')
})

test('a hostile tail full of candidate footers ends in bounded time with a stream error', () => {
  // thousands of "7e 00000002" runs: every one is a candidate end of the first section
  const body = Buffer.concat(Array.from({ length: 20000 }, () => Buffer.from([0x7e, 0, 0, 0, 2, 0x04])))
  const tail = withDesc(full(2, 'x', 0, 1, body).subarray(0, -5), [{ name: 'x', instance_id: 0, fields: [] }, gsDesc])
  const t0 = Date.now()
  const code = codeOf(() => check(tail))
  assert.ok(code === 'SNAP_STREAM_CORRUPT', String(code))
  assert.ok(Date.now() - t0 < 5000, `${Date.now() - t0} ms`)
})

test.run()
