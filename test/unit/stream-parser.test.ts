import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { xbzrleEncode } from '../../src/stream/xbzrle.js'
import { ramStartSection, sectionPartHeader, fileHeader } from '../../src/stream/encoder.js'
import {
  BLOCKS,
  configElement,
  deviceTail,
  expectError,
  pageOf,
  parseAll,
  parseWith,
  subsection,
  synthStream,
  u32,
  u64,
  type Rec,
} from './stream-helpers.js'

const tail = deviceTail()

// Page 3 of pc.ram changes between the rounds; the XBZRLE delta is made against round one.
const p3a = pageOf(3)
const p3b = Buffer.from(p3a)
p3b.fill(0xee, 100, 140)
p3b[4000] ^= 1
const delta = xbzrleEncode(p3a, p3b) as Buffer

const round1: Rec[] = [
  ['zero', 0, 0], ['zero', 0, 1], ['page', 0, 2, pageOf(2)], ['page', 0, 3, p3a],
  ['page', 1, 0, pageOf(100)], ['zero', 1, 1], ['page', 2, 0, pageOf(200)],
]
const round2: Rec[] = [
  ['page', 2, 0, pageOf(201)], // CONTINUE across the section boundary (same block as the last record)
  ['raw', u64(0, 0x200)], // MULTIFD_FLUSH on the main channel
  ['xbzrle', 0, 3, delta], ['zero', 0, 2], ['page', 0, 15, pageOf(15)],
]
const endRecs: Rec[] = [['page', 1, 1, pageOf(101)]]

const main = synthStream({ parts: [round1, round2], end: endRecs, tail })

test('a synthetic stream: every sink call, in order, whatever the chunking', () => {
  const o = parseAll(main)
  assert.not.ok(o.error, o.error?.message)
  const c = o.calls
  assert.is(c[0], 'blocks pc.ram:65536,pc.bios:8192,/rom@etc/acpi/rsdp:4096')
  assert.equal(c.map((s) => s.split(' ').slice(0, 3).join(' ')).slice(1), [
    'zero 0 0', 'zero 0 1', 'page 0 2', 'page 0 3', 'page 1 0', 'zero 1 1', 'page 2 0',
    'page 2 0', 'xbzrle 0 3', 'zero 0 2', 'page 0 15', 'page 1 1',
  ])
  const ram = o.sink.ram
  assert.ok(ram[0].subarray(3 * 4096, 4 * 4096).equals(p3b), 'XBZRLE applied against round one')
  assert.ok(ram[0].subarray(2 * 4096, 3 * 4096).every((b) => b === 0))
  assert.ok(ram[2].equals(pageOf(201)))
  assert.ok(ram[1].subarray(4096).equals(pageOf(101)))
  assert.equal(o.counters, { pages: 7, zeroPages: 4, xbzrlePages: 1, resentPages: 4, bytesIn: main.length, sections: 6 })
  const s = o.state!
  assert.is(s.machine, 'pc-i440fx-10.0')
  assert.ok(s.config.equals(configElement()))
  assert.is(s.ramSectionId, 1)
  assert.is(s.ramInstanceId, 0)
  assert.is(s.ramVersion, 4)
  assert.is(s.switchoverStart, true)
  assert.is(s.ramEnd, true)
  assert.ok(s.deviceSections.equals(tail.deviceSections))
  assert.ok(s.streamEnd.equals(tail.streamEnd))
})

test('page data is a view into the input when the page lies in one chunk', () => {
  const o = parseWith(main, 0)
  assert.is(o.sink.views, 7)
})

test('background snapshot: no END, no SWITCHOVER_START; a FULL after the PARTs ends the RAM', () => {
  const o = parseAll(synthStream({ parts: [round1, round2], noEnd: true, switchover: false }))
  assert.not.ok(o.error, o.error?.message)
  assert.is(o.state!.ramEnd, false)
  assert.is(o.state!.switchoverStart, false)
  assert.is(o.counters!.sections, 5)
})

test('no VM description: a lone EOF after the device sections, or no device sections at all', () => {
  const t = deviceTail({ vmdesc: false })
  const o = parseAll(synthStream({ parts: [round1], tail: t }))
  assert.not.ok(o.error, o.error?.message)
  assert.ok(o.state!.deviceSections.equals(t.deviceSections))
  assert.ok(o.state!.streamEnd.equals(Buffer.from([0])))
  const bare = parseAll(synthStream({ parts: [round1], tail: { deviceSections: Buffer.alloc(0), streamEnd: Buffer.from([0]) } }))
  assert.not.ok(bare.error, bare.error?.message)
  assert.is(bare.state!.deviceSections.length, 0)
})

test('configuration subsections: target-page-bits 12 and uuid are kept; others refused', () => {
  const cfg = configElement('pc-q35-10.0', [subsection('configuration/target-page-bits', 1, u32(12)), subsection('configuration/uuid', 1, Buffer.alloc(16, 0xab))])
  const o = parseAll(synthStream({ config: cfg, parts: [round1] }))
  assert.not.ok(o.error, o.error?.message)
  assert.ok(o.state!.config.equals(cfg))
  assert.is(o.state!.machine, 'pc-q35-10.0')
  expectError(synthStream({ config: configElement('x', [subsection('configuration/target-page-bits', 1, u32(16))]), parts: [] }), 'SNAP_STREAM_UNSUPPORTED', /page/)
  expectError(synthStream({ config: configElement('x', [subsection('configuration/frob', 1, u32(1))]), parts: [] }), 'SNAP_STREAM_UNSUPPORTED', /configuration\/frob/)
  for (const cap of ['mapped-ram', 'x-ignore-shared']) {
    const caps = subsection('configuration/capabilities', 1, Buffer.concat([u32(1), Buffer.from([cap.length]), Buffer.from(cap)]))
    expectError(synthStream({ config: configElement('pc', [caps]), parts: [] }), 'SNAP_STREAM_UNSUPPORTED', new RegExp(cap))
  }
  const noCaps = subsection('configuration/capabilities', 1, u32(0))
  assert.not.ok(parseAll(synthStream({ config: configElement('pc', [noCaps]), parts: [] })).error)
})

test('header: bad magic, version 2, no configuration element', () => {
  const s = Buffer.from(main)
  s[0] = 0x51 + 1
  expectError(s, 'SNAP_STREAM_BAD_MAGIC')
  const v2 = Buffer.from(main)
  v2[7] = 2
  expectError(v2, 'SNAP_STREAM_VERSION')
  expectError(Buffer.concat([main.subarray(0, 8), Buffer.from(ramStartSection({ sectionId: 1, instanceId: 0, version: 4 }, BLOCKS))]), 'SNAP_STREAM_UNSUPPORTED')
})

const head = () => Buffer.concat([fileHeader(configElement()), ramStartSection({ sectionId: 1, instanceId: 0, version: 4 }, BLOCKS)])
const cmd = (n: number, payload: Buffer = Buffer.alloc(0)) => Buffer.concat([Buffer.from([0x08, 0, n]), Buffer.from([payload.length >> 8, payload.length & 0xff]), payload])

test('commands: return path and postcopy refused with the fix, unknown ones corrupt', () => {
  const hdr = fileHeader(configElement())
  for (const [n, payload] of [[1, Buffer.alloc(0)], [2, u32(1)], [3, Buffer.alloc(16)], [4, Buffer.alloc(0)], [5, Buffer.alloc(0)], [7, u32(10)]] as const) {
    expectError(Buffer.concat([hdr, cmd(n, payload)]), 'SNAP_STREAM_UNSUPPORTED', /return-path and postcopy-ram/)
  }
  expectError(Buffer.concat([hdr, cmd(3)]), 'SNAP_STREAM_UNSUPPORTED', /dirty-bitmaps/)
  expectError(Buffer.concat([hdr, cmd(8)]), 'SNAP_STREAM_UNSUPPORTED', /COLO/)
  expectError(Buffer.concat([hdr, cmd(0)]), 'SNAP_STREAM_CORRUPT')
  expectError(Buffer.concat([hdr, cmd(99)]), 'SNAP_STREAM_CORRUPT')
  expectError(Buffer.concat([hdr, cmd(11, u32(0))]), 'SNAP_STREAM_CORRUPT', /SWITCHOVER_START/)
})

test('other iterative sections and early device sections are refused, naming them', () => {
  const hdr = fileHeader(configElement())
  const start = (name: string) => Buffer.concat([Buffer.from([0x01]), u32(5), Buffer.from([name.length]), Buffer.from(name), u32(0), u32(1)])
  expectError(Buffer.concat([head(), start('dirty-bitmap')]), 'SNAP_STREAM_UNSUPPORTED', /dirty-bitmap/)
  expectError(Buffer.concat([hdr, start('0000:00:05.0/vfio')]), 'SNAP_STREAM_UNSUPPORTED', /vfio/)
  expectError(Buffer.concat([hdr, tail.deviceSections]), 'SNAP_STREAM_UNSUPPORTED', /early-setup/)
  expectError(Buffer.concat([head(), ramStartSection({ sectionId: 1, instanceId: 0, version: 4 }, BLOCKS)]), 'SNAP_STREAM_CORRUPT', /second ram START/)
  expectError(Buffer.concat([hdr, Buffer.from([0])]), 'SNAP_STREAM_CORRUPT', /before its RAM/)
})

const part = (...recs: Buffer[]) => Buffer.concat([head(), sectionPartHeader(1), ...recs])
const name = (s: string) => Buffer.concat([Buffer.from([s.length]), Buffer.from(s)])

test('bad ram records', () => {
  expectError(part(u64(0, 0x2), name('pc.ram'), Buffer.from([1])), 'SNAP_STREAM_CORRUPT', /fill byte/)
  expectError(part(u64(0, 0x22), Buffer.from([0])), 'SNAP_STREAM_CORRUPT', /CONTINUE/)
  expectError(part(u64(0, 0x2), name('pc.nope'), Buffer.from([0])), 'SNAP_STREAM_CORRUPT', /pc\.nope/)
  expectError(part(u64(0, 0x10002), name('pc.ram'), Buffer.from([0])), 'SNAP_STREAM_CORRUPT', /past the end/)
  expectError(part(u64(0, 0x40), name('pc.ram'), Buffer.from([2, 0, 1, 0])), 'SNAP_STREAM_CORRUPT', /encoding flag/)
  expectError(part(u64(0, 0x40), name('pc.ram'), Buffer.from([1, 0, 0])), 'SNAP_STREAM_CORRUPT', /XBZRLE record of 0/)
  expectError(part(u64(0, 0x40), name('pc.ram'), Buffer.from([1, 0x10, 0x01])), 'SNAP_STREAM_CORRUPT', /XBZRLE record of 4097/)
  expectError(part(u64(0, 0x100), name('pc.ram')), 'SNAP_STREAM_UNSUPPORTED', /compress/)
  expectError(part(u64(0, 0x80)), 'SNAP_STREAM_UNSUPPORTED', /RDMA/)
  expectError(part(u64(0, 0x01)), 'SNAP_STREAM_CORRUPT', /FULL/)
  expectError(part(u64(0, 0x0a)), 'SNAP_STREAM_CORRUPT', /flags 0xa/)
  expectError(part(u64(0, 0x04)), 'SNAP_STREAM_CORRUPT', /MEM_SIZE/)
  expectError(part(u64(0, 0x10), Buffer.from([0x7e]), u32(2)), 'SNAP_STREAM_CORRUPT', /footer/)
  expectError(Buffer.concat([head(), Buffer.from([0x02]), u32(9)]), 'SNAP_STREAM_CORRUPT', /section 9/)
  expectError(Buffer.concat([head(), Buffer.from([0x09])]), 'SNAP_STREAM_CORRUPT', /0x9/)
  // the XBZRLE data itself is checked by the sink's decoder
  expectError(part(u64(0, 0x40), name('pc.ram'), Buffer.from([1, 0, 1, 5])), 'SNAP_STREAM_CORRUPT', /XBZRLE/)
})

test('the block list: totals must add up; absurd lengths are refused without allocating', () => {
  const start = (total: Buffer, ...list: Buffer[]) => Buffer.concat([fileHeader(configElement()), Buffer.from([0x01]), u32(1), name('ram'), u32(0), u32(4), total, ...list])
  expectError(start(u64(0x10000000, 0x4)), 'SNAP_STREAM_TOO_LARGE') // 2^60
  expectError(start(u64(0x100000, 0x4)), 'SNAP_STREAM_TOO_LARGE') // 2^52: past the RAM cap
  expectError(start(u64(0, 0x2004), name('a'), u64(0, 0x1000), name('b'), u64(0, 0x2000)), 'SNAP_STREAM_CORRUPT', /add up/)
  expectError(start(u64(0, 0x2004), name('a'), u64(0, 0x1000), name('a'), u64(0, 0x1000)), 'SNAP_STREAM_CORRUPT', /twice/)
  expectError(start(u64(0, 0x2004), name('a'), u64(0, 0x1800)), 'SNAP_STREAM_UNSUPPORTED')
  expectError(start(u64(0, 0x0004)), 'SNAP_STREAM_CORRUPT')
  expectError(start(u64(0, 0x1004), name('a'), u64(0x200000, 0)), 'SNAP_STREAM_TOO_LARGE')
  const bigName = Buffer.concat([Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, 0x07]), u32(0xffffffff)])
  expectError(bigName, 'SNAP_STREAM_CORRUPT', /machine type name/)
  // a VM description length of 0xFFFFFFFF: not the end of a finished stream
  const t = deviceTail()
  const bad = Buffer.from(t.streamEnd)
  bad.writeUInt32BE(0xffffffff, 2)
  expectError(synthStream({ parts: [round1], tail: { deviceSections: t.deviceSections, streamEnd: bad } }), 'SNAP_STREAM_TRUNCATED')
})

test('device tail: the description must match the sections byte for byte', () => {
  const t = deviceTail()
  const ds = Buffer.from(t.deviceSections)
  ds[ds.length - 1] ^= 1 // the last footer's id
  expectError(synthStream({ parts: [], tail: { deviceSections: ds, streamEnd: t.streamEnd } }), 'SNAP_STREAM_CORRUPT', /footer/)
  const longer = Buffer.concat([t.deviceSections, Buffer.from([0x04])])
  expectError(synthStream({ parts: [], tail: { deviceSections: longer, streamEnd: t.streamEnd } }), 'SNAP_STREAM_CORRUPT')
  const shorter = t.deviceSections.subarray(0, t.deviceSections.length - 1)
  expectError(synthStream({ parts: [], tail: { deviceSections: shorter, streamEnd: t.streamEnd } }), 'SNAP_STREAM_CORRUPT')
})

test('maxDeviceBytes caps what is kept after the RAM', () => {
  const s = synthStream({ parts: [round1] })
  const o = parseWith(s, 7, { maxDeviceBytes: 100 })
  assert.is(o.error?.code, 'SNAP_STREAM_TOO_LARGE')
  assert.not.ok(parseWith(s, 7, { maxDeviceBytes: 100000 }).error)
})

test('truncation at every offset: a stream error, never a raw exception, never a hang', () => {
  const s = synthStream({ parts: [round1.slice(0, 3), [['zero', 2, 0]]], end: [], tail })
  const eof = s.length - tail.streamEnd.length
  for (let cut = 0; cut < s.length; cut++) {
    const o = cut % 11 === 0 || cut > eof - 8 ? parseAll(s.subarray(0, cut)) : parseWith(s.subarray(0, cut), 0)
    if (cut === eof + 1) {
      // exactly EOF and nothing after: a legal stream without a VM description
      assert.not.ok(o.error, `cut at ${cut}: ${o.error?.message}`)
      continue
    }
    assert.ok(o.error, `cut at ${cut} of ${s.length} parsed`)
    assert.is(o.error.code, 'SNAP_STREAM_TRUNCATED', `cut at ${cut}: ${o.error.code} ${o.error.message}`)
  }
})

test('single-byte corruptions and random bytes: only stream errors', () => {
  const s = synthStream({ parts: [round1.slice(0, 2)], end: [], tail })
  const codes = new Set(['SNAP_STREAM_BAD_MAGIC', 'SNAP_STREAM_VERSION', 'SNAP_STREAM_TRUNCATED', 'SNAP_STREAM_CORRUPT', 'SNAP_STREAM_UNSUPPORTED', 'SNAP_STREAM_TOO_LARGE'])
  let seed = 12345
  const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 16) & 0xff
  for (let i = 0; i < s.length; i++) {
    const c = Buffer.from(s)
    c[i] ^= 1 << (i % 8)
    const o = i % 17 === 0 ? parseAll(c) : parseWith(c, 0)
    if (o.error) assert.ok(codes.has(o.error.code), `byte ${i}: ${o.error.code}`)
  }
  for (let n = 0; n < 200; n++) {
    const r = Buffer.alloc(50 + n * 13)
    for (let i = 0; i < r.length; i++) r[i] = rnd()
    if (n % 2) s.copy(r, 0, 0, 8 + (n % 40)) // a valid start, then noise
    const o = parseWith(r, 0)
    assert.ok(o.error && codes.has(o.error.code), `random input ${n}: ${o.error?.code}`)
  }
})

test('push after an error rethrows it; end after a cut is truncated', () => {
  const o = parseAll(Buffer.concat([head(), Buffer.from([0x09])]))
  assert.is(o.error?.code, 'SNAP_STREAM_CORRUPT')
  const cut = parseAll(main.subarray(0, 3000))
  assert.is(cut.error?.code, 'SNAP_STREAM_TRUNCATED')
  assert.match(cut.error!.message, /inside a ram PAGE record/)
  const none = parseAll(Buffer.alloc(0))
  assert.is(none.error?.code, 'SNAP_STREAM_TRUNCATED')
})

test.run()
