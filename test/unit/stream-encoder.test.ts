import { test } from 'uvu'
import * as assert from 'uvu/assert'
import {
  PageRecordWriter,
  eosFooter,
  fileHeader,
  openReturnPath,
  packaged,
  ping,
  postcopyAdvise,
  postcopyListen,
  postcopyRun,
  ramStartSection,
  sectionEndHeader,
  sectionPartHeader,
  switchoverStart,
} from '../../src/stream/encoder.js'

const hex = (b: Buffer) => b.toString('hex')
const h = (s: string) => s.replace(/\s+/g, '')

test('fileHeader: magic, version 3, then the configuration element verbatim', () => {
  const cfg = Buffer.from(h('07 0000000e 70632d6934343066782d31302e30'), 'hex')
  assert.is(hex(fileHeader(cfg)), h('5145564d 00000003') + cfg.toString('hex'))
})

test('ramStartSection: the bytes QEMU 10 writes for pc-i440fx -m 16M (reference §2.3, §10)', () => {
  const b = ramStartSection({ sectionId: 1, instanceId: 0, version: 4 }, [
    { name: 'pc.ram', size: 0x1000000 },
    { name: '/rom@etc/acpi/tables', size: 0x20000 },
    { name: 'pc.bios', size: 0x40000 },
    { name: 'pc.rom', size: 0x20000 },
    { name: '/rom@etc/table-loader', size: 0x1000 },
    { name: '/rom@etc/acpi/rsdp', size: 0x1000 },
  ])
  const expected =
    '01 00000001 03 72616d 00000000 00000004' +
    '0000000001082004' +
    '06 70632e72616d 0000000001000000' +
    '14 2f726f6d406574632f616370692f7461626c6573 0000000000020000' +
    '07 70632e62696f73 0000000000040000' +
    '06 70632e726f6d 0000000000020000' +
    '15 2f726f6d406574632f7461626c652d6c6f61646572 0000000000001000' +
    '12 2f726f6d406574632f616370692f72736470 0000000000001000' +
    '0000000000000010 7e00000001'
  assert.is(hex(b), h(expected))
})

test('ramStartSection for a postcopy destination: page_size after a hugepage block only (reference §2.3)', () => {
  const b = ramStartSection({ sectionId: 1, instanceId: 0, version: 4 }, [
    { name: 'mem', size: 0x400000 },
    { name: 'pc.bios', size: 0x40000 },
  ], [0x200000, 0x1000])
  const expected =
    '01 00000001 03 72616d 00000000 00000004' +
    '0000000000440004' +
    '03 6d656d 0000000000400000 0000000000200000' +
    '07 70632e62696f73 0000000000040000' +
    '0000000000000010 7e00000001'
  assert.is(hex(b), h(expected))
})

test('section headers, EOS + footer', () => {
  assert.is(hex(sectionPartHeader(1)), '0200000001')
  assert.is(hex(sectionEndHeader(0x01020304)), '0301020304')
  assert.is(hex(eosFooter(1)), h('0000000000000010 7e00000001'))
})

test('commands (reference §5.1, §10)', () => {
  assert.is(hex(openReturnPath()), '0800010000')
  assert.is(hex(ping(1)), '080002000400000001')
  assert.is(hex(postcopyAdvise(0x1000, 0x1000)), h('08 0003 0010 0000000000001000 0000000000001000'))
  assert.is(hex(postcopyAdvise(0x201000)), h('08 0003 0010 0000000000201000 0000000000001000'))
  assert.is(hex(postcopyListen()), '0800040000')
  assert.is(hex(postcopyRun()), '0800050000')
  assert.is(hex(packaged(0x12345)), h('08 0007 0004 00012345'))
  assert.is(hex(switchoverStart()), '08000b0000')
})

test('PageRecordWriter: names the block, then CONTINUE while it stays the same', () => {
  const w = new PageRecordWriter([{ name: 'pc.ram', size: 0x10000 }, { name: 'pc.bios', size: 0x2000 }])
  const page = Buffer.alloc(4096, 0x5a)
  w.zero(0, 0)
  w.zero(0, 1)
  w.page(0, 2, page)
  w.zero(1, 1)
  w.raw(Buffer.from('0200000001', 'hex'))
  w.zero(1, 0) // CONTINUE persists across sections, as in QEMU
  w.forgetBlock()
  w.xbzrle(1, 1, Buffer.from([0, 1, 9]))
  assert.equal(w.take(), [], 'nothing full yet')
  const out = Buffer.concat(w.flush())
  const expected =
    '0000000000000002 06 70632e72616d 00' + // ZERO, addr 0, block pc.ram, fill 0 (reference §10)
    '0000000000001022 00' + // a CONTINUE zero page at 0x1000
    '0000000000002028' + '5a'.repeat(4096) +
    '0000000000001002 07 70632e62696f73 00' +
    '0200000001' +
    '0000000000000022 00' +
    '0000000000001040 07 70632e62696f73 01 0003 000109'
  assert.is(hex(out), h(expected))
  assert.equal(w.flush(), [])
})

test('PageRecordWriter: fills chunks, hands out full ones, passes big raw blobs through', () => {
  const w = new PageRecordWriter([{ name: 'b', size: 0x100000 }], { chunkSize: 10000 })
  const page = Buffer.alloc(4096, 1)
  w.page(0, 0, page) // 8 + 2 + 4096
  w.page(0, 1, page) // 8 + 4096 -> 8210 bytes so far
  w.page(0, 2, page) // does not fit: a new chunk
  const full = w.take()
  assert.equal(full.map((b) => b.length), [8210])
  w.raw(Buffer.alloc(20000, 7)) // bigger than a chunk
  w.raw(Buffer.from([1, 2, 3]))
  const rest = w.flush()
  assert.equal(rest.map((b) => b.length), [4104, 20000, 3])
  assert.is(hex(rest[0].subarray(0, 8)), '0000000000002028')
})

test.run()
