// QEMU 10 loads a stream written by src/stream/encoder.ts: the RAM of the fixture stream plus
// changes made with re-sent PAGE, XBZRLE and ZERO records across sections, and the fixture's
// device state verbatim. Then the guest RAM QEMU holds is compared with what was sent.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { eosFooter, sectionPartHeader } from '../../src/stream/encoder.js'
import { xbzrleEncode } from '../../src/stream/xbzrle.js'
import { Vm } from '../../tools/vm.js'
import { pageOf, parseWith, replay } from '../unit/stream-helpers.js'

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..')
const fixture = readFileSync(join(root, 'test', 'fixtures', 'qemu10-pc-16M.stream'))

test('QEMU 10 accepts a stream written by the encoder', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'snapctl-stream-'))
  let vm: Vm | undefined
  try {
    const o = parseWith(fixture, 0)
    assert.not.ok(o.error, o.error?.message)
    const s = o.state!
    // a second round: pc.ram pages 0x300.. re-sent, one as an XBZRLE delta, one zeroed again
    const a = pageOf(0x300)
    const b2 = Buffer.from(a)
    b2.fill(0x42, 10, 50)
    const stream = replay(o, {
      between: (w, id) => {
        w.raw(sectionPartHeader(id))
        w.page(0, 0x300, a)
        w.page(0, 0x301, pageOf(0x301))
        w.xbzrle(0, 0x300, xbzrleEncode(a, b2)!)
        w.zero(0, 0x301)
        w.page(0, 0x302, pageOf(0x302))
        w.raw(eosFooter(id))
      },
      endPages: (w) => w.page(0, 0x303, pageOf(0x303)),
    })
    const streamPath = join(dir, 'in.stream')
    writeFileSync(streamPath, stream)

    vm = await Vm.start({ name: 'stream', memMiB: 16, anonymousRam: true, machine: s.machine, incoming: 'defer', dir })
    await vm.migrateIncoming(`file:${streamPath}`)
    const status = (await vm.waitMigration({ timeoutMs: 30_000 })).status
    assert.is(status, 'completed', `incoming migration: ${status}; QEMU said: ${vm.stderr}`)
    const ram = await vm.readGuest(0x300000, 0x4000)
    assert.ok(ram.subarray(0, 4096).equals(b2), 'XBZRLE page')
    assert.ok(ram.subarray(4096, 8192).every((x) => x === 0), 'page zeroed again')
    assert.ok(ram.subarray(8192, 12288).equals(pageOf(0x302)))
    assert.ok(ram.subarray(12288).equals(pageOf(0x303)), 'page sent in the END section')
  } finally {
    await vm?.quit()
    rmSync(dir, { recursive: true, force: true })
  }
})

test.run()
