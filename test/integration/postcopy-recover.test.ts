// A lazy restore that survives its source, against real QEMU 10: the load of a `restore --lazy`
// is killed (SIGKILL) in postcopy, the destination pauses (postcopy-paused), and
// `restore --lazy --recover` continues it through migrate-recover (received bitmaps,
// POSTCOPY_RESUME) until completed, with the RAM byte-identical to the saved one. A recovery
// killed in its turn is recovered again. The background push is throttled
// ($SNAPCTL_POSTCOPY_PUSH_RATE) so that each kill lands while pages are still missing.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { readFileSync } from 'node:fs'
import { filesEqual, processesWith } from '../../tools/vm.js'
import { MiB, SNAPCTL, Workdir, savedVm, parseJson, snapctl } from './helpers.js'

const w = new Workdir('pc-recover')
test.after(() => w.cleanup())

const RAM_MIB = 256
/** 256 MiB at 24 MiB/s: about 10 s of postcopy, time enough to kill it early */
const SLOW = { ...process.env, SNAPCTL_POSTCOPY_PUSH_RATE: String(24 * MiB) }
let ram = ''
let image = ''

test.before(async () => {
  ({ ram, image } = await savedVm(w, 'rec-src', RAM_MIB, 33))
})

/** The pid of the `snapctl load --postcopy` serving `image` (the restore's peer). */
function loadPid(recover: boolean): number {
  const found = processesWith(['load', '--postcopy', image]).filter((pid) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes('--recover') === recover)
  assert.is(found.length, 1, `one load --postcopy${recover ? ' --recover' : ''} of ${image}: ${found.join(', ')}`)
  return found[0]
}

/** Waits for postcopy-active, the VM runnable (RUN handled) and `ms` more of the push: pages are in, most are not. */
async function inPostcopy(dst: Awaited<ReturnType<Workdir['vm']>>, ms: number): Promise<void> {
  const st = await dst.waitMigration({ until: ['postcopy-active', 'completed', 'failed'], timeoutMs: 60_000 })
  assert.is(st.status, 'postcopy-active', JSON.stringify(st))
  while ((await dst.qmp.execute<{ status: string }>('query-status')).status === 'inmigrate') await new Promise((r) => setTimeout(r, 20))
  await new Promise((r) => setTimeout(r, ms))
  assert.is((await dst.qmp.execute<{ status: string }>('query-migrate')).status, 'postcopy-active', 'still in postcopy when killed')
}

test('load killed in postcopy: postcopy-paused; refused without --recover; recovered twice; RAM identical', async () => {
  const qmp = w.path('rec-dst-snapctl.qmp')
  const dst = await w.vm({ name: 'rec-dst', memMiB: RAM_MIB, incoming: 'defer', keepMem: true, extraArgs: ['-qmp', `unix:${qmp},server=on,wait=off`] })
  const first = snapctl(['restore', image, '--qmp', qmp, '--lazy', '--paused', '--json'], { env: SLOW })
  await inPostcopy(dst, 1000)
  process.kill(loadPid(false), 'SIGKILL')
  let st = await dst.waitMigration({ until: ['postcopy-paused', 'completed', 'failed'], timeoutMs: 30_000 })
  assert.is(st.status, 'postcopy-paused', JSON.stringify(st))
  const r1 = await first
  assert.is.not(r1.code, 0)
  assert.match(r1.stdout + r1.stderr, /postcopy-paused.*--lazy --recover/, JSON.stringify(r1))

  // Without --recover: refused, nothing changed.
  const plain = await snapctl(['restore', image, '--qmp', qmp, '--lazy'])
  assert.is(plain.code, 10, plain.stderr)
  assert.match(plain.stderr, /SNAP_POSTCOPY_PAUSED/)
  assert.is((await dst.qmp.execute<{ status: string }>('query-migrate')).status, 'postcopy-paused')

  // A recovery, killed in postcopy in its turn: paused again.
  const second = snapctl(['restore', image, '--qmp', qmp, '--lazy', '--recover', '--paused', '--json'], { env: SLOW })
  await inPostcopy(dst, 1000)
  process.kill(loadPid(true), 'SIGKILL')
  st = await dst.waitMigration({ until: ['postcopy-paused', 'completed', 'failed'], timeoutMs: 30_000 })
  assert.is(st.status, 'postcopy-paused', JSON.stringify(st))
  const r2 = await second
  assert.is.not(r2.code, 0)
  assert.match(r2.stdout + r2.stderr, /postcopy-paused.*--lazy --recover/, JSON.stringify(r2))

  // Recovered again, at full speed, to the end.
  const t0 = performance.now()
  const third = await snapctl(['restore', image, '--qmp', qmp, '--lazy', '--recover', '--paused', '--json'])
  const ms = performance.now() - t0
  assert.is(third.code, 0, `${third.stdout}${third.stderr}\nQEMU: ${dst.stderr}`)
  const j = parseJson(third)
  assert.ok(j.recovered === true && j.lazy === true && j.pagesReceivedBefore > 0 && j.pagesReceivedBefore < j.pages, JSON.stringify(j))
  assert.is((await dst.qmp.execute<{ status: string }>('query-migrate')).status, 'completed')
  assert.equal(await filesEqual(ram, dst.memPath), { equal: true })
  console.log(`recover: the destination had ${j.pagesReceivedBefore} of ${j.pages} pages; --recover to completed ${j.lastPageSeconds?.toFixed(2)} s (command ${(ms / 1000).toFixed(2)} s), resumed after ${j.runnableSeconds?.toFixed(3)} s`)
  await dst.quit()
})

test('an exec: lazy restore (no preempt channel) killed in postcopy: --recover goes over exec: too; RAM identical', async () => {
  const qmp = w.path('ex-dst-snapctl.qmp')
  const dst = await w.vm({ name: 'ex-dst', memMiB: RAM_MIB, incoming: 'defer', keepMem: true, extraArgs: ['-qmp', `unix:${qmp},server=on,wait=off`] })
  await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'postcopy-ram', state: true }] })
  const rate = `SNAPCTL_POSTCOPY_PUSH_RATE=${24 * MiB}`
  await dst.qmp.execute('migrate-incoming', { uri: `exec:env ${rate} ${SNAPCTL} load --postcopy ${image}`, 'exit-on-error': false })
  await inPostcopy(dst, 1000)
  process.kill(loadPid(false), 'SIGKILL')
  const st = await dst.waitMigration({ until: ['postcopy-paused', 'completed', 'failed'], timeoutMs: 30_000 })
  assert.is(st.status, 'postcopy-paused', JSON.stringify(st))
  const r = await snapctl(['restore', image, '--qmp', qmp, '--lazy', '--recover', '--paused', '--json'])
  assert.is(r.code, 0, `${r.stdout}${r.stderr}\nQEMU: ${dst.stderr}`)
  const j = parseJson(r)
  assert.ok(j.recovered === true && j.pagesReceivedBefore > 0, JSON.stringify(j))
  assert.is((await dst.qmp.execute<{ status: string }>('query-migrate')).status, 'completed')
  assert.equal(await filesEqual(ram, dst.memPath), { equal: true })
  await dst.quit()
})

test('--recover into a destination that is not paused: SNAP_NOT_PAUSED, nothing changed', async () => {
  const qmp = w.path('np-dst-snapctl.qmp')
  const dst = await w.vm({ name: 'np-dst', memMiB: RAM_MIB, incoming: 'defer', extraArgs: ['-qmp', `unix:${qmp},server=on,wait=off`] })
  const r = await snapctl(['restore', image, '--qmp', qmp, '--lazy', '--recover'])
  assert.is(r.code, 10, r.stderr)
  assert.match(r.stderr, /SNAP_NOT_PAUSED/)
  assert.match(r.stderr, /none, not postcopy-paused/)
  assert.is((await dst.qmp.execute<{ status: string }>('query-status')).status, 'inmigrate')
  await dst.quit()
})

test.run()
