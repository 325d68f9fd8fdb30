// Parallel channels (issue 13): QEMU's multifd into one dense image (`create --listen`) and
// back (`load --connect --channels N`), against real QEMU 10 under TCG, and bad peers.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { existsSync, readFileSync, readdirSync, rmSync } from 'node:fs'
import { createConnection } from 'node:net'
import { encodeInit, encodePacketHeader } from '../../src/multifd/packet.js'
import { eosFooter, fileHeader, ramStartSection, sectionEndHeader, sectionPartHeader } from '../../src/stream/encoder.js'
import { StreamParser } from '../../src/stream/parser.js'
import type { RamBlockDecl } from '../../src/types.js'
import { FIXTURE } from '../../tools/fuzz/targets.js'
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
    // Once without its page index: load --connect rebuilds it (after the pages, while the destination loads the rest).
    if (n === 2) rmSync(`${paused}.index`, { recursive: true, force: true })
    const { dst, r, status } = await connectLoad(`dst-${n}`, paused, n)
    assert.is(r.code, 0, r.stderr)
    assert.is(status, 'completed')
    assert.equal(await filesEqual(sourceRam, dst.memPath), { equal: true })
    if (n === 2) assert.ok(existsSync(`${paused}.index`), 'the page index was rebuilt')
    await dst.quit()
  })
}

test('create --listen --threads 2 (clusters compressed on a pool thread) from 4 channels: verify passes, restored byte-identical', async () => {
  const src = await w.vm({ name: 'src-threads', memMiB: 256, memPath: sourceRam })
  const image = w.path('threads.snap')
  const r = parseJson(await listenCreate(src, image, 4, { extra: ['--threads', '2'] }))
  await src.quit()
  assert.is(r.stats.channels, 4)
  assert.is(r.stats.threads, 2)
  assert.is((await snapctl(['verify', image])).code, 0)
  const { dst, r: l, status } = await connectLoad('dst-threads', image, 2)
  assert.is(l.code, 0, l.stderr)
  assert.is(status, 'completed')
  assert.equal(await filesEqual(sourceRam, dst.memPath), { equal: true })
  await dst.quit()
})

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

// ---- bad peers -----------------------------------------------------------------------------

const PAGE = 4096
const BLOCKS: RamBlockDecl[] = [{ name: 'mem', size: 64 * PAGE }]
const device = (() => {
  const parser = new StreamParser({ blocks() {}, zero() {}, page() {}, xbzrle() {} })
  parser.push(readFileSync(FIXTURE))
  return parser.end()
})()
const FLUSH = Buffer.from('0000000000000200', 'hex')

/** What a QEMU with multifd sends (qemu-multifd-peer.md §4.3), for `channels` channels: each part editable. */
function streams(channels = 2): { main: Buffer[]; chans: Buffer[][] } {
  const id = device.ramSectionId
  const start = ramStartSection({ sectionId: id, instanceId: device.ramInstanceId, version: device.ramVersion }, BLOCKS)
  const main = [
    fileHeader(device.config), start.subarray(0, start.length - 13), FLUSH, eosFooter(id),
    sectionPartHeader(id), FLUSH, eosFooter(id), sectionEndHeader(id), eosFooter(id), device.deviceSections, device.streamEnd,
  ]
  const sync = (): Buffer => encodePacketHeader({ flags: 1, pagesAlloc: 0, normalPages: 0, zeroPages: 0, packetNum: 0n, ramblock: '', offsets: [] })
  const chans = Array.from({ length: channels }, (_, i) => {
    const pages = [0, 1, 2, 3].map((k) => i * 8 + k)
    const header = encodePacketHeader({ flags: 0, pagesAlloc: 128, normalPages: 4, zeroPages: 0, packetNum: 1n, ramblock: 'mem', offsets: pages.map((p) => p * PAGE) })
    return [encodeInit({ uuid: Buffer.alloc(16), id: i }), sync(), header, Buffer.alloc(4 * PAGE, i + 1), sync()]
  })
  return { main, chans }
}

let fakes = 0
/** `create --listen` fed by a fake QEMU; asserts that nothing is left behind, returns the error code. */
async function fakeSave(edit: (s: { main: Buffer[] | null; chans: Buffer[][] }) => void, env: NodeJS.ProcessEnv = {}): Promise<string> {
  const k = ++fakes
  const image = w.path(`fake-${k}.snap`)
  const sock = `${image}.sock`
  const child = snapctl(['create', image, '--listen', `unix:${sock}`, '--json'], { env })
  await waitFor(sock)
  const s: { main: Buffer[] | null; chans: Buffer[][] } = streams()
  edit(s)
  const conns = [...(s.main ? [s.main] : []), ...s.chans].map((parts) => {
    const c = createConnection({ path: sock })
    c.on('error', () => {})
    if (parts.length > 0) c.end(Buffer.concat(parts)) // none: connected and silent
    return c
  })
  const r = await child
  for (const c of conns) c.destroy()
  assert.not.ok(existsSync(image), 'no image')
  assert.equal(readdirSync(w.dir).filter((f) => f.startsWith(`.fake-${k}.snap`) || f === `fake-${k}.snap.index` || f === `fake-${k}.snap.sock`), [], 'nothing left behind')
  return r.code === 0 ? 'ok' : (JSON.parse(r.stdout.toString()).error?.code ?? `exit ${r.code}`)
}

test('a fake QEMU with 2 channels makes an image (the bad peers below differ from it in one thing)', async () => {
  const image = w.path('fake-good.snap')
  const sock = `${image}.sock`
  const child = snapctl(['create', image, '--listen', `unix:${sock}`, '--json'])
  await waitFor(sock)
  for (const parts of [streams().main, ...streams().chans]) createConnection({ path: sock }).end(Buffer.concat(parts))
  const r = parseJson(await child)
  assert.is(r.stats.channels, 2)
  assert.is(r.storedPages, 8)
})

test('bad peers: each a clear error with a stable code, no image left, nothing hangs', async () => {
  const cut = (b: Buffer, n: number): Buffer => b.subarray(0, b.length - n)
  // a channel that closes in the middle of a packet, and one that closes before its last SYNC
  assert.is(await fakeSave((s) => (s.chans[1] = [s.chans[1][0], s.chans[1][1], s.chans[1][2], cut(s.chans[1][3], 100)])), 'SNAP_MULTIFD_TRUNCATED')
  assert.is(await fakeSave((s) => s.chans[0].pop()), 'SNAP_MULTIFD_TRUNCATED')
  // a wrong VM uuid on one channel
  assert.is(await fakeSave((s) => (s.chans[1][0] = encodeInit({ uuid: Buffer.alloc(16, 7), id: 1 }))), 'SNAP_MULTIFD_UUID')
  // a packet naming an unknown block, an offset past the block's end
  assert.is(await fakeSave((s) => (s.chans[0][2] = encodePacketHeader({ flags: 0, pagesAlloc: 128, normalPages: 4, zeroPages: 0, packetNum: 1n, ramblock: 'pc.nope', offsets: [0, 1, 2, 3].map((p) => p * PAGE) }))), 'SNAP_MULTIFD_BAD_PAGE')
  assert.is(await fakeSave((s) => s.chans[0][2].writeUInt32BE(64 * PAGE, 320 + 4)), 'SNAP_MULTIFD_BAD_PAGE')
  // page counts beyond the packet's size; an oversized length
  assert.is(await fakeSave((s) => s.chans[0][2].writeUInt32BE(200, 32)), 'SNAP_MULTIFD_CORRUPT')
  assert.is(await fakeSave((s) => s.chans[0][2].writeUInt32BE(0xffffffff, 12)), 'SNAP_MULTIFD_TOO_LARGE')
  assert.is(await fakeSave((s) => s.chans[0][2].writeUInt32BE(0x7fffffff, 20)), 'SNAP_MULTIFD_TOO_LARGE')
  // wrong magic on a channel's packet
  assert.is(await fakeSave((s) => s.chans[0][2].writeUInt32BE(0x11223345, 0)), 'SNAP_MULTIFD_BAD_MAGIC')
  // a channel that never connects: QEMU then never writes the main channel (the main connects, silent)
  const quick = { SNAPCTL_CHANNEL_TIMEOUT_MS: '700' }
  assert.is(await fakeSave((s) => ((s.main = []), (s.chans = [])), quick), 'SNAP_CHANNEL_TIMEOUT')
  // nobody connects at all
  assert.is(await fakeSave((s) => ((s.main = null), (s.chans = [])), quick), 'SNAP_CHANNEL_TIMEOUT')
})

/** migrate-incoming unix:SOCK with multifd and N channels, keeping QEMU alive on failure (to read why). */
async function incoming(vm: Vm, sock: string, n: number): Promise<void> {
  await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] })
  await vm.qmp.execute('migrate-set-parameters', { 'multifd-channels': n })
  await vm.qmp.execute('migrate-incoming', { uri: `unix:${sock}`, 'exit-on-error': false })
}

test('load --connect to a destination with another -uuid fails with a code; too few channels time out; nothing hangs', async () => {
  const dst = await w.vm({ name: 'uuid-dst', memMiB: 256, incoming: 'defer', extraArgs: ['-uuid', '6f1c2a9e-0011-2233-4455-66778899aabb'] })
  const sock = w.path('uuid-dst.sock')
  await incoming(dst, sock, 2)
  await waitFor(sock)
  const r = await snapctl(['load', paused, '--connect', `unix:${sock}`, '--channels', '2'], { env: { SNAPCTL_CHANNEL_TIMEOUT_MS: '5000' } })
  assert.is(r.code, 6, r.stderr)
  assert.match(r.stderr, /snapctl: SNAP_IO: /)
  assert.is((await dst.waitMigration({ timeoutMs: 10_000 })).status, 'failed')
  await dst.quit()

  // 2 channels for a destination that waits for 4: it never starts loading, our writes stall
  const few = await w.vm({ name: 'few-dst', memMiB: 256, incoming: 'defer' })
  const fsock = w.path('few-dst.sock')
  await incoming(few, fsock, 4)
  await waitFor(fsock)
  const started = Date.now()
  const r2 = await snapctl(['load', paused, '--connect', `unix:${fsock}`, '--channels', '2', '--timeout', '1500'])
  assert.is(r2.code, 4, r2.stderr)
  assert.match(r2.stderr, /snapctl: SNAP_CHANNEL_TIMEOUT: /)
  assert.ok(Date.now() - started < 20_000)
  few.kill()
})

test.run()
