// The real stream QEMU 10.0 wrote for a stopped pc machine with 16 MiB (tools/make-stream-fixtures.sh).
import { readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import type { DeviceState } from '../../src/types.js'
import {
  PageRecordWriter,
  eosFooter,
  fileHeader,
  ramStartSection,
  sectionEndHeader,
  sectionPartHeader,
  switchoverStart,
} from '../../src/stream/encoder.js'
import { parseAll, type Outcome } from './stream-helpers.js'

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..')
const file = readFileSync(join(root, 'test', 'fixtures', 'qemu10-pc-16M.stream'))

const BLOCKS = [
  'pc.ram:16777216',
  '/rom@etc/acpi/tables:131072',
  'pc.bios:262144',
  'pc.rom:131072',
  '/rom@etc/table-loader:4096',
  '/rom@etc/acpi/rsdp:4096',
]

let first: Outcome

test('parses whole and in pieces: blocks, machine, every page once', () => {
  first = parseAll(file)
  assert.not.ok(first.error, first.error?.message)
  assert.is(first.calls[0], `blocks ${BLOCKS.join(',')}`)
  const c = first.counters!
  assert.is(c.pages + c.zeroPages, 0x1082000 / 4096, 'a stopped VM sends every page exactly once')
  assert.is(c.resentPages, 0)
  assert.is(c.xbzrlePages, 0)
  assert.ok(c.pages > 0 && c.zeroPages > 0)
  assert.is(c.bytesIn, file.length)
  const s = first.state!
  assert.is(s.machine, 'pc-i440fx-10.0')
  assert.is(s.config.toString('hex'), '070000000e' + Buffer.from('pc-i440fx-10.0').toString('hex'))
  assert.is(s.ramSectionId, 1)
  assert.is(s.ramInstanceId, 0)
  assert.is(s.ramVersion, 4)
  assert.is(s.switchoverStart, true)
  assert.is(s.ramEnd, true)
})

test('deviceSections and streamEnd are the file bytes, found independently', () => {
  const s = first.state!
  // the ram END section with only EOS, then its footer
  const end = Buffer.from('0300000001' + '0000000000000010' + '7e00000001', 'hex')
  const devStart = file.lastIndexOf(end) + end.length
  // the VM description: EOF, 0x06, BE u32 length reaching the end of the file
  let eof = -1
  for (let p = file.length - 6; p > devStart; p--) {
    if (file[p] === 0 && file[p + 1] === 6 && p + 6 + file.readUInt32BE(p + 2) === file.length) {
      eof = p
      break
    }
  }
  assert.ok(devStart > end.length && eof > devStart)
  assert.ok(s.deviceSections.equals(file.subarray(devStart, eof)))
  assert.ok(s.streamEnd.equals(file.subarray(eof)))
  assert.is(s.streamEnd.subarray(6, 30).toString(), '{"configuration": {"vmsd')
  assert.is(file[devStart], 0x04)
  assert.is(first.counters!.sections, 3 + 30, 'START, PART, END and 30 device sections')
})

/** Write a stream from what the parser gave: the pages as the sink saw them, the device state verbatim. */
function reencode(o: Outcome, s: DeviceState): Buffer {
  const blocks = o.sink.blockList
  const w = new PageRecordWriter(blocks)
  const ids = { sectionId: s.ramSectionId, instanceId: s.ramInstanceId, version: s.ramVersion }
  w.raw(fileHeader(s.config))
  w.raw(ramStartSection(ids, blocks))
  w.raw(sectionPartHeader(ids.sectionId))
  for (const call of o.calls.slice(1)) {
    const [kind, b, p] = call.split(' ')
    const block = Number(b)
    const page = Number(p)
    if (kind === 'zero') w.zero(block, page)
    else w.page(block, page, o.sink.ram[block].subarray(page * 4096, page * 4096 + 4096))
  }
  w.raw(eosFooter(ids.sectionId))
  if (s.switchoverStart) w.raw(switchoverStart())
  w.raw(sectionEndHeader(ids.sectionId))
  w.raw(eosFooter(ids.sectionId))
  w.raw(s.deviceSections)
  w.raw(s.streamEnd)
  return Buffer.concat(w.flush())
}

test('round trip: re-encode pages and device state, parse again, same result', () => {
  const again = reencode(first, first.state!)
  const second = parseAll(again)
  assert.not.ok(second.error, second.error?.message)
  assert.equal(second.calls, first.calls)
  assert.equal(second.ram, first.ram)
  assert.equal(second.state, first.state)
  assert.equal({ ...second.counters, bytesIn: 0 }, { ...first.counters, bytesIn: 0 })
  // QEMU's own encoding of this stream is what our encoder writes, byte for byte
  assert.ok(again.equals(file), 'the re-encoded stream is identical to the file')
})

test.run()
