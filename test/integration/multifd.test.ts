// Parallel channels (issue 13): QEMU's multifd into one dense image (`create --listen`) and
// back (`load --connect --channels N`), against real QEMU 10 under TCG, and bad peers.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { existsSync } from 'node:fs'
import { buildGuest, fillRam, filesEqual, type Vm } from '../../tools/vm.js'
import { MiB, Workdir, execLoad, parseJson, snapctl, type RunResult } from './helpers.js'

const w = new Workdir('multifd')
test.after(() => w.cleanup())

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))

async function waitFor(path: string, ms = 20_000): Promise<void> {
  for (const end = Date.now() + ms; !existsSync(path); await sleep(10)) if (Date.now() > end) throw new Error(`${path} never appeared`)
}

/** `snapctl create IMAGE --listen unix:SOCK`, QEMU migrating to it with `channels` multifd channels (0: none). */
export async function listenCreate(vm: Vm, image: string, channels: number, opts: { extra?: string[]; parameters?: Record<string, unknown>; capabilities?: Record<string, boolean>; during?: () => Promise<void> } = {}): Promise<RunResult> {
  const sock = `${image}.sock`
  const child = snapctl(['create', image, '--listen', `unix:${sock}`, '--json', ...(opts.extra ?? [])])
  await waitFor(sock)
  await vm.migrate(`unix:${sock}`, {
    capabilities: { ...(channels > 0 ? { multifd: true } : {}), ...opts.capabilities },
    parameters: { 'max-bandwidth': 64 * 1024 * MiB, ...(channels > 0 ? { 'multifd-channels': channels } : {}), ...opts.parameters },
  })
  await opts.during?.()
  const info = await vm.waitMigration({ timeoutMs: 120_000 })
  const r = await child
  if (info.status !== 'completed' || r.code !== 0) throw new Error(`save failed: migration ${info.status}, create exit ${r.code}: ${r.stderr}`)
  return r
}

let sourceRam = ''
const paused = w.path('paused.snap')

test('a paused 256 MiB VM saved with 4 multifd channels: one dense image, every page once', async () => {
  sourceRam = w.path('src.ram')
  await fillRam(sourceRam, 256 * MiB, { seed: 13 })
  const src = await w.vm({ name: 'src', memMiB: 256, memPath: sourceRam })
  const r = parseJson(await listenCreate(src, paused, 4))
  assert.is(r.stats.channels, 4)
  assert.ok(r.stats.epochs >= 2, `epochs ${r.stats.epochs}`)
  const info = parseJson(await snapctl(['info', paused, '--json']))
  const mem = info.ramBlocks.find((b: { name: string }) => b.name === 'mem')
  assert.is(mem.zeroPages + mem.storedPages, mem.ramPages, 'every page held exactly once')
  assert.is(info.deadBytes, 0)
  assert.is((await snapctl(['verify', paused])).code, 0)
  const dst = await w.vm({ name: 'dst-exec', memMiB: 256, incoming: 'defer', keepMem: true })
  await execLoad(dst, paused)
  assert.equal(await filesEqual(sourceRam, dst.memPath), { equal: true })
  await dst.quit()
})

/** `snapctl load IMAGE --connect unix:SOCK --channels N` into a fresh destination with multifd-channels N. */
async function connectLoad(name: string, image: string, channels: number, extra: string[] = [], memMiB = 256): Promise<{ dst: Vm; r: RunResult; status: string }> {
  const dst = await w.vm({ name, memMiB, incoming: 'defer', keepMem: true })
  const sock = w.path(`${name}.sock`)
  await dst.migrateIncoming(`unix:${sock}`, {
    capabilities: channels > 0 ? { multifd: true } : {},
    parameters: channels > 0 ? { 'multifd-channels': channels } : {},
  })
  await waitFor(sock)
  const r = await snapctl(['load', image, '--connect', `unix:${sock}`, '--channels', String(channels), ...extra])
  const info = await dst.waitMigration({ timeoutMs: 60_000, until: ['completed', 'failed', 'cancelled'] }).catch(() => ({ status: 'stuck' }))
  return { dst, r, status: info.status }
}

for (const n of [1, 2, 8]) {
  test(`the 4-channel image restored over ${n} multifd channel(s): byte-identical`, async () => {
    const { dst, r, status } = await connectLoad(`dst-${n}`, paused, n)
    assert.is(r.code, 0, r.stderr)
    assert.is(status, 'completed')
    assert.equal(await filesEqual(sourceRam, dst.memPath), { equal: true })
    await dst.quit()
  })
}

test('snapctl save --channels 4 and restore --channels 2 over QMP: byte-identical', async () => {
  const qmp = (name: string): string[] => ['-qmp', `unix:${w.path(`${name}-snapctl.qmp`)},server=on,wait=off`] // a second QMP socket for snapctl
  const src = await w.vm({ name: 'qmp-src', memMiB: 256, memPath: sourceRam, extraArgs: qmp('qmp-src') })
  const image = w.path('qmp.snap')
  const saved = await snapctl(['save', image, '--qmp', w.path('qmp-src-snapctl.qmp'), '--channels', '4', '--json'])
  assert.is(saved.code, 0, `save: ${saved.stderr} ${saved.stdout}`)
  const caps = await src.qmp.execute<Array<{ capability: string; state: boolean }>>('query-migrate-capabilities')
  assert.is(caps.find((c) => c.capability === 'multifd')?.state, false, 'multifd put back')
  const dst = await w.vm({ name: 'qmp-dst', memMiB: 256, incoming: 'defer', keepMem: true, extraArgs: qmp('qmp-dst') })
  const restored = await snapctl(['restore', image, '--qmp', w.path('qmp-dst-snapctl.qmp'), '--channels', '2', '--paused', '--json'])
  assert.is(restored.code, 0, `restore: ${restored.stderr}`)
  assert.equal(await filesEqual(sourceRam, dst.memPath), { equal: true })
  await src.quit()
  await dst.quit()
})

test('a live save of a dirtying guest over 2 multifd channels restores its final RAM (pages resolved by SYNC epoch)', async () => {
  const src = await w.vm({ name: 'live-src', memMiB: 64, kernel: buildGuest(), paused: false, append: 'hot=4 sweep=4' })
  for (let i = 0; (await src.readGuest(0x7004, 4)).readUInt32LE(0) === 0; i++) {
    if (i > 400) throw new Error(`guest did not start\n${src.stderr}`)
    await sleep(50)
  }
  const image = w.path('live.snap')
  const r = parseJson(
    await listenCreate(src, image, 2, {
      // 1 ms downtime cannot be met while the guest rewrites its hot region: QEMU keeps iterating
      // (re-sending pages in later epochs) until we let it finish.
      parameters: { 'max-bandwidth': 32 * MiB, 'downtime-limit': 1 },
      during: async () => {
        await src.waitMigration({ done: (i) => i.ram?.['dirty-sync-count'] >= 5, timeoutMs: 120_000 })
        await src.qmp.execute('migrate-set-parameters', { 'downtime-limit': 2000 })
      },
    }),
  )
  assert.is((await src.status()).status, 'postmigrate')
  assert.ok(r.stats.epochs >= 5, `epochs ${r.stats.epochs}`)
  assert.ok(r.stats.stream.resentRecords > 0, JSON.stringify(r.stats))
  const info = parseJson(await snapctl(['info', image, '--json']))
  assert.ok(info.deadBytes <= 0.02 * info.fileBytes, `dead ${info.deadBytes} of ${info.fileBytes}`)
  // Dense: the file within 1.05x of the non-zero RAM it holds (LZ4 makes it smaller still).
  assert.ok(info.fileBytes <= 1.05 * info.storedPages * 4096 + 64 * 1024, `file ${info.fileBytes}, stored pages ${info.storedPages}`)
  const dst = await w.vm({ name: 'live-dst', memMiB: 64, incoming: 'defer', keepMem: true })
  await execLoad(dst, image)
  assert.equal(await filesEqual(src.memPath, dst.memPath), { equal: true })
  await dst.quit()
  await src.quit()
})

test.run()
