// Lazy restore over a unix socket with the postcopy-preempt channel, against real QEMU 10:
// `load --postcopy --connect unix:PATH` and `restore --lazy --qmp` (which uses it). Requested
// pages come on the preempt channel; the RAM must end byte-identical, with guest reads over
// QMP answered while pages are still missing.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { readFileSync } from 'node:fs'
import { spawn } from 'node:child_process'
import { filesEqual } from '../../tools/vm.js'
import { fileRange, SNAPCTL_BIN, Workdir, savedVm, parseJson, snapctl } from './helpers.js'

const w = new Workdir('pc-socket')
test.after(() => w.cleanup())


const RAM_MIB = 256
let ram = ''
let image = ''

test.before(async () => {
  ({ ram, image } = await savedVm(w, 'sock-src', RAM_MIB, 21))
})

/** Guest reads at scattered addresses while postcopy runs: each must see the saved bytes. */
async function readWhileActive(dst: Awaited<ReturnType<Workdir['vm']>>, n: number): Promise<number> {
  let checked = 0
  for (let i = 0; i < n; i++) {
    const addr = ((((i + 7) * 2654435761) >>> 0) % (RAM_MIB * 256)) * 4096
    if (addr >= 0xa0000 && addr < 0x100000) continue // VGA/ROM hole below 1 MiB
    const got = await dst.readGuest(addr + 100, 64)
    assert.equal(got, fileRange(ram, addr + 100, 64), `guest read at 0x${addr.toString(16)}`)
    checked++
  }
  return checked
}

test('load --postcopy --connect unix:PATH: requests answered on the preempt channel, RAM identical', async () => {
  const dst = await w.vm({ name: 'sock-dst', memMiB: RAM_MIB, incoming: 'defer', keepMem: true })
  const sock = w.path('dst.mig')
  await dst.migrateIncoming(`unix:${sock}`, { capabilities: { 'postcopy-ram': true, 'postcopy-preempt': true } })
  const stats = w.path('load.stats')
  const child = spawn(process.execPath, [SNAPCTL_BIN, 'load', '--postcopy', '--connect', `unix:${sock}`, image, '--stats', stats], { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (d) => (stderr += d))
  const exited = new Promise<number | null>((r) => child.on('close', (c) => r(c)))
  const active = await dst.waitMigration({ until: ['postcopy-active', 'completed', 'failed'], timeoutMs: 60_000 })
  assert.is(active.status, 'postcopy-active', JSON.stringify(active) + stderr)
  const checked = await readWhileActive(dst, 24)
  const done = await dst.waitMigration({ timeoutMs: 120_000 })
  assert.is(done.status, 'completed', JSON.stringify(done) + stderr)
  assert.is(await exited, 0, stderr)
  assert.ok(checked >= 20)
  assert.equal(await filesEqual(ram, dst.memPath), { equal: true })
  const s = JSON.parse(readFileSync(stats, 'utf8'))
  assert.ok(s.requests > 0 && s.latencyMs.p50 > 0 && s.preempt === true, JSON.stringify(s))
  assert.ok(s.pagesServedOnRequest > 0 && s.pagesServedOnRequest <= s.requestedPages, JSON.stringify(s))
  assert.ok(s.lastPageSeconds >= s.deviceStateSeconds && s.lastPageSeconds <= s.seconds && s.prefetchedPages === 0, JSON.stringify(s))
  // The set-up's steps, in the order they happen, in ms since the process started.
  const p = s.phasesMs
  assert.ok(p.processStart > 1.6e12 && p.started > 0 && p.started <= p.imageOpen && p.imageOpen <= p.connected && p.connected <= p.advised && p.advised <= p.deviceState, JSON.stringify(p))
  await dst.quit()
})

test('restore --lazy --qmp goes over the socket with preempt; reads during postcopy; RAM identical', async () => {
  const qmp = w.path('rdst-snapctl.qmp')
  const dst = await w.vm({ name: 'rdst', memMiB: RAM_MIB, incoming: 'defer', keepMem: true, extraArgs: ['-qmp', `unix:${qmp},server=on,wait=off`] })
  const run = snapctl(['restore', image, '--qmp', qmp, '--lazy', '--paused', '--json'])
  const active = await dst.waitMigration({ until: ['postcopy-active', 'completed', 'failed'], timeoutMs: 60_000 })
  const checked = active.status === 'postcopy-active' ? await readWhileActive(dst, 16) : 0
  const r = await run
  assert.is(r.code, 0, r.stderr)
  const j = parseJson(r)
  assert.is(j.lazy, true)
  assert.ok(j.requests !== null && j.runnableSeconds > 0, JSON.stringify(j))
  for (const k of ['p50', 'p99', 'max']) assert.type(j.latencyMs[k], 'number', JSON.stringify(j))
  assert.ok(j.deviceStateSeconds > 0 && j.pagesServedOnRequest >= 0 && j.prefetchedPages === 0 && j.prefetchedTouched === 0, JSON.stringify(j))
  assert.equal(await filesEqual(ram, dst.memPath), { equal: true })
  const caps = await dst.qmp.execute<Array<{ capability: string; state: boolean }>>('query-migrate-capabilities')
  assert.equal(caps.filter((c) => c.state && c.capability.startsWith('postcopy')).map((c) => c.capability), [], 'postcopy capabilities are off again')
  console.log(`restore --lazy over the socket: ${checked} reads during postcopy, ${j.requests} requests (p50 ${j.latencyMs.p50} ms, p99 ${j.latencyMs.p99} ms), runnable ${j.runnableSeconds.toFixed(3)} s, all ${j.seconds.toFixed(2)} s`)
  await dst.quit()
})

test.run()
