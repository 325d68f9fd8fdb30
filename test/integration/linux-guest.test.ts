// A real Linux guest (tools/linux-guest: Debian's cloud kernel, busybox, memwork) with virtio
// devices and a user-mode NIC, saved live while it runs (plainly, and with XBZRLE under a
// bandwidth limit), then restored eagerly and lazily into fresh QEMUs that run at once. The guest
// checks itself: its heartbeat counter must go on from where the saved guest stopped, and every
// heartbeat after the restore must say its tmpfs data and rewritten memory are what it wrote.
// Between the two, the guest runs on and is saved again with --base (an incremental image over
// the plain one), restored from that chain eagerly and lazily in the same way.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { existsSync, readFileSync } from 'node:fs'
import { LINUX_CMDLINE, MEMWORK_DEFAULTS, SerialLog, linuxGuest, type Heartbeat } from '../../tools/linux-guest.js'
import type { Vm, VmOptions } from '../../tools/vm.js'
import { MiB, Workdir, execCreate, execLoad, execUri, parseJson, snapctl, waitStatus } from './helpers.js'

const w = new Workdir('linux-guest')
const logs: SerialLog[] = []
test.after(async () => {
  for (const l of logs) l.stop()
  await w.cleanup()
})

const DEVICES = [
  '-smp', '2', '-no-reboot',
  '-netdev', 'user,id=n0', '-device', 'virtio-net-pci,netdev=n0',
  '-device', 'virtio-rng-pci', '-device', 'virtio-balloon-pci',
]
// Long enough for memwork to re-check all of its data at least once after a restore.
const WATCH_MS = Math.max(3000, (MEMWORK_DEFAULTS.data / MEMWORK_DEFAULTS.check + 2) * MEMWORK_DEFAULTS.ms)

function guestVm(name: string, extra: Partial<VmOptions> = {}): Promise<Vm> {
  const { kernel, initrd } = linuxGuest()
  // The destination gets the same -kernel/-initrd: they put an option ROM (a RAM block) in the VM.
  return w.vm({ name, memMiB: 512, machine: 'q35', kernel, initrd, append: LINUX_CMDLINE, paused: false, extraArgs: DEVICES, ...extra })
}

function follow(vm: Vm): SerialLog {
  const log = new SerialLog(vm.logPath)
  logs.push(log)
  return log
}

const secs = (ms: number): string => `${(ms / 1000).toFixed(2)} s`
const timing = (what: string): void => console.log(`linux-guest timing: ${what}`)

interface Saved {
  image: string
  /** last heartbeat seen before migrate */
  before: Heartbeat
  /** last heartbeat in the source's log once the migration completed (the VM stopped there) */
  final: Heartbeat
  /** the source's query-migrate once completed */
  info: any
}

let src: Vm
let srcLog: SerialLog
let dataSum = ''
const saved: Record<string, Saved> = {}

test('the guest boots, loads its virtio drivers, writes its data and beats', async () => {
  const t0 = performance.now()
  src = await guestVm('lg-src')
  srcLog = follow(src)
  const ready = await srcLog.waitFor(/^READY .* sum=([0-9a-f]{16})/, 120_000)
  timing(`boot to READY ${secs(ready.line.at - t0)}`)
  dataSum = ready[1]!
  const virtio = await srcLog.waitFor(/^INIT virtio:(.*)$/, 1000)
  for (const d of ['virtio_net', 'virtio_rng', 'virtio_balloon']) assert.ok(virtio[1]!.includes(d), `driver ${d} not bound: ${virtio[0]}`)
  assert.match((await srcLog.waitFor(/^INIT net:.*$/, 1000))[0], /eth0/)
  const hbs = await srcLog.waitHeartbeats(3, 30_000)
  for (const hb of hbs) assert.equal([hb.ok, hb.detail], [true, dataSum], hb.text)
})

async function saveLive(kind: string, opts: Parameters<Vm['migrate']>[1], whileRunning?: () => Promise<void>, extra = ''): Promise<void> {
  const image = w.path(`${kind}.snap`)
  const before = srcLog.lastHeartbeat()!
  const t0 = performance.now()
  const migrating = execCreate(w, src, image, extra, opts)
  migrating.catch(() => {})
  await whileRunning?.()
  await migrating
  const ms = performance.now() - t0
  assert.is((await src.status()).status, 'postmigrate')
  const info: any = await src.qmp.execute('query-migrate')
  const final = srcLog.lastHeartbeat()!
  assert.ok(final.ok, final.text)
  timing(
    `save ${kind}: migrate->completed ${secs(ms)} (QEMU total ${info['total-time']} ms, downtime ${info.downtime} ms, ` +
      `${info.ram?.['dirty-sync-count']} dirty syncs, ${info.ram?.transferred} bytes sent, ` +
      `${info['xbzrle-cache']?.pages ?? 0} xbzrle pages); heartbeat ${before.counter} -> ${final.counter} while saving`,
  )
  const v = await snapctl(['verify', image])
  assert.is(v.code, 0, v.stderr)
  saved[kind] = { image, before, final, info }
}

/** Back to running for the next save: a completed outgoing migration may be continued. */
async function runOn(kind: string): Promise<void> {
  const mark = srcLog.mark()
  await src.qmp.execute('cont')
  const [next] = await srcLog.waitHeartbeats(1, 10_000, mark)
  assert.is(next!.counter, saved[kind]!.final.counter + 1, next!.text)
}

test('saved live, plain', async () => {
  await saveLive('plain', {})
  await runOn('plain')
})

test('runs on and writes, saved live again with --base plain.snap: an incremental image', async () => {
  // memwork rewrites its hot pages every beat: a few beats, then the save.
  await srcLog.waitHeartbeats(3, 10_000, srcLog.mark())
  await saveLive('incremental', {}, undefined, `--base ${w.path('plain.snap')}`)
  const info = parseJson(await snapctl(['info', w.path('incremental.snap'), '--json']))
  const full = parseJson(await snapctl(['info', w.path('plain.snap'), '--json']))
  timing(`incremental image ${info.fileBytes} bytes, ${info.basePages} of ${info.ramPages} pages from the base; the full one ${full.fileBytes} bytes (${((100 * info.fileBytes) / full.fileBytes).toFixed(1)}%)`)
  assert.equal(info.chain.layers.map((l: { path: string }) => l.path), [w.path('incremental.snap'), w.path('plain.snap')])
  assert.ok(info.basePages > 0 && info.storedPages > 0, JSON.stringify({ basePages: info.basePages, storedPages: info.storedPages }))
  assert.ok(info.fileBytes < full.fileBytes / 2, `incremental ${info.fileBytes} bytes, full ${full.fileBytes}`)
  await runOn('incremental')
})

test('saved live with xbzrle and a bandwidth limit', async () => {
  await saveLive('xbzrle', { capabilities: { xbzrle: true }, parameters: { 'max-bandwidth': 64 * MiB, 'downtime-limit': 1 } }, async () => {
    // A 1 ms downtime keeps QEMU going round after round while memwork rewrites its hot pages;
    // from the third round on it sends XBZRLE deltas. Those rounds are so short that one often
    // ends before the guest dirtied anything, and then QEMU finishes by itself; if it has not
    // after a few rounds of deltas, a normal limit lets it. (Until it is active, query-migrate
    // still shows the plain save as completed.)
    await src.waitMigration({ until: ['active', 'failed', 'cancelled'], timeoutMs: 30_000 })
    await src.waitMigration({ done: (i) => i.ram?.['dirty-sync-count'] >= 6 && i['xbzrle-cache']?.pages > 0, timeoutMs: 120_000 })
    await src.qmp.execute('migrate-set-parameters', { 'downtime-limit': 300 })
  })
  const { before, final, info } = saved.xbzrle!
  assert.ok(info.ram['dirty-sync-count'] >= 3, `only ${info.ram['dirty-sync-count']} rounds`)
  assert.ok(info['xbzrle-cache']?.pages > 0, `no XBZRLE pages: ${JSON.stringify(info)}`)
  assert.ok(final.counter > before.counter, 'the guest ran while it was saved')
  await src.quit()
})

/** Restores `kind` into a new running QEMU; checks and times its first heartbeats. */
async function restore(kind: string, lazy: boolean): Promise<void> {
  const { image, before, final } = saved[kind]!
  const how = lazy ? 'lazy' : 'eager'
  const dst = await guestVm(`lg-${kind}-${how}`, { incoming: 'defer' })
  const log = follow(dst)
  const t0 = performance.now()
  const first = log.waitHeartbeats(1, 120_000)
  first.catch(() => {})
  let active = NaN
  if (lazy) {
    const status = `${image}.postcopy-status-${how}`
    const errFile = `${image}.postcopy-stderr`
    await dst.migrateIncoming(execUri(`load --postcopy ${image}`, status, errFile), { capabilities: { 'postcopy-ram': true } })
    const pa = await dst.waitMigration({ until: ['postcopy-active', 'completed', 'failed'], timeoutMs: 60_000 })
    active = performance.now() - t0
    const done = pa.status === 'postcopy-active' ? await dst.waitMigration({ timeoutMs: 120_000 }) : pa
    const err = existsSync(errFile) ? readFileSync(errFile, 'utf8') : ''
    assert.is(done.status, 'completed', `${JSON.stringify(done)} ${err}\n${dst.stderr}`)
    assert.is(await waitStatus(status), 0, err)
  } else {
    await execLoad(dst, image)
  }
  const completed = performance.now() - t0
  const [hb] = await first
  assert.is((await dst.status()).status, 'running')
  timing(
    `restore ${kind} ${how}: migrate-incoming->${lazy ? `postcopy-active ${secs(active)}, ->` : ''}completed ${secs(completed)}, ` +
      `->first heartbeat ${secs(hb!.at - t0)} (HB ${hb!.counter}; saved guest's last ${final.counter})`,
  )
  assert.ok(hb!.counter > before.counter && hb!.counter > final.counter, `heartbeat went back: ${hb!.counter} after ${final.counter}`)
  // The source may have been stopped in the middle of printing a line: then the next one is first.
  assert.ok(hb!.counter <= final.counter + 2, `heartbeat jumped: ${hb!.counter} after ${final.counter}`)

  await new Promise((r) => setTimeout(r, Math.max(0, hb!.at + WATCH_MS - performance.now())))
  const hbs = log.heartbeats()
  assert.ok(hbs.length >= WATCH_MS / MEMWORK_DEFAULTS.ms / 2, `only ${hbs.length} heartbeats in ${WATCH_MS} ms:\n${log.tail()}`)
  for (const [i, h] of hbs.entries()) {
    assert.equal([h.ok, h.detail], [true, dataSum], `after ${how} restore of ${kind}: ${h.text}`)
    if (i > 0) assert.is(h.counter, hbs[i - 1]!.counter + 1, `heartbeats not consecutive:\n${log.tail()}`)
  }
  await dst.quit()
}

test('plain image restored eagerly: the guest runs on, its data intact', () => restore('plain', false))
test('plain image restored lazily: the guest runs on, its data intact', () => restore('plain', true))
test('xbzrle image restored eagerly: the guest runs on, its data intact', () => restore('xbzrle', false))
test('xbzrle image restored lazily: the guest runs on, its data intact', () => restore('xbzrle', true))
test('incremental image (a chain of 2) restored eagerly: the guest runs on, its data intact', () => restore('incremental', false))
test('incremental image (a chain of 2) restored lazily: the guest runs on, its data intact', () => restore('incremental', true))

test.run()
