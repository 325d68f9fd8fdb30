// The real stream QEMU 10.0 wrote for a stopped pc machine with 16 MiB (tools/make-stream-fixtures.sh).
import { readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { parseAll, replay, type Outcome } from './stream-helpers.js'

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

test('round trip: re-encode pages and device state, parse again, same result', () => {
  const again = replay(first)
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
