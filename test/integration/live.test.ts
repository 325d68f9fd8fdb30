// A running guest that keeps dirtying memory, saved live with XBZRLE and a bandwidth limit, so
// QEMU re-sends pages and sends deltas: the image must hold each page once (dead bytes <= 2%)
// and restore the source's final RAM byte for byte.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { readFileSync } from 'node:fs'
import { buildGuest, filesEqual } from '../../tools/vm.js'
import { MiB, Workdir, execCreate, execLoad, parseJson, snapctl } from './helpers.js'

const w = new Workdir('live')
test.after(() => w.cleanup())

test('live migration with xbzrle: re-sent and delta pages land once; restored RAM is the final RAM', async () => {
  const src = await w.vm({ name: 'live-src', memMiB: 64, kernel: buildGuest(), paused: false, append: 'hot=4 sweep=4' })
  // Wait for the guest to be running (its heartbeat lives at 0x7000).
  for (let i = 0; (await src.readGuest(0x7004, 4)).readUInt32LE(0) === 0; i++) {
    if (i > 400) throw new Error(`guest did not start\n${src.stderr}`)
    await new Promise((r) => setTimeout(r, 50))
  }
  const image = w.path('live.snap')
  const migrating = execCreate(w, src, image, `--stats ${image}.stats`, {
    capabilities: { xbzrle: true },
    // 1 ms downtime cannot be met while the hot region is rewritten: QEMU keeps iterating and
    // sends XBZRLE deltas from its third pass; then we let it finish.
    parameters: { 'max-bandwidth': 32 * MiB, 'downtime-limit': 1 },
  })
  await src.waitMigration({ done: (i) => i.ram?.['dirty-sync-count'] >= 5 && i['xbzrle-cache']?.pages > 0, timeoutMs: 120_000 })
  await src.qmp.execute('migrate-set-parameters', { 'downtime-limit': 2000 })
  await migrating
  assert.is((await src.status()).status, 'postmigrate')

  const stats = JSON.parse(readFileSync(`${image}.stats`, 'utf8'))
  assert.ok(stats.stream.xbzrleRecords > 0, `xbzrle records: ${JSON.stringify(stats)}`)
  assert.ok(stats.stream.resentRecords > 0, `re-sent records: ${JSON.stringify(stats)}`)

  const info = parseJson(await snapctl(['info', image, '--json']))
  assert.ok(info.deadBytes <= 0.02 * info.fileBytes, `dead ${info.deadBytes} of ${info.fileBytes}`)
  const mem = info.ramBlocks.find((b: { name: string }) => b.name === 'mem')
  assert.is(mem.zeroPages + mem.storedPages, mem.ramPages, 'every page held exactly once')
  assert.is((await snapctl(['verify', image])).code, 0)

  const dst = await w.vm({ name: 'live-dst', memMiB: 64, incoming: 'defer', keepMem: true })
  await execLoad(dst, image)
  assert.equal(await filesEqual(src.memPath, dst.memPath), { equal: true })
})

test.run()
