// Lazy restore against real QEMU 10: `migrate-incoming exec:snapctl load --postcopy`. The
// destination must reach postcopy-active at once, serve the saved content for reads of any
// address while pages are still missing, and end with RAM byte-identical to the saved RAM.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { existsSync, readFileSync } from 'node:fs'
import { buildGuest, fillRam, filesEqual, GUEST_STATUS_ADDR } from '../../tools/vm.js'
import { MiB, fileRange, Workdir, execCreate, execUri, waitStatus } from './helpers.js'

const w = new Workdir('postcopy')
test.after(() => w.cleanup())


test('1 GiB image restored lazily into a paused destination', async () => {
  const ram = w.path('big.ram')
  await fillRam(ram, 1024 * MiB, { seed: 11 })
  const src = await w.vm({ name: 'pc-src', memMiB: 1024, memPath: ram })
  const image = w.path('big.snap')
  await execCreate(w, src, image)
  await src.quit()

  const dst = await w.vm({ name: 'pc-dst', memMiB: 1024, incoming: 'defer', keepMem: true })
  const status = `${image}.postcopy-status`
  const t0 = performance.now()
  await dst.migrateIncoming(execUri(`load --postcopy ${image} --stats ${image}.pstats`, status, `${image}.pstderr`), {
    capabilities: { 'postcopy-ram': true },
  })
  const active = await dst.waitMigration({ until: ['postcopy-active', 'completed', 'failed'], timeoutMs: 60_000 })
  const toActive = performance.now() - t0
  assert.is(active.status, 'postcopy-active', JSON.stringify(active))
  assert.ok(toActive < 5000, `postcopy-active after ${toActive} ms`)

  // Reads while pages are still arriving: each one faults the page in through the return path.
  const checked: number[] = []
  for (let i = 0; i < 24; i++) {
    const addr = (Math.floor(((i * 2654435761) >>> 0) % (1024 * 256)) * 4096) % (1024 * MiB)
    if (addr >= 0xa0000 && addr < 0x100000) continue // VGA/ROM hole below 1 MiB
    const got = await dst.readGuest(addr + 512, 256)
    assert.equal(got, fileRange(ram, addr + 512, 256), `guest read at 0x${addr.toString(16)}`)
    checked.push(addr)
  }
  const done = await dst.waitMigration({ timeoutMs: 300_000 })
  assert.is(done.status, 'completed', JSON.stringify(done))
  assert.is(await waitStatus(status), 0, readFileSync(`${image}.pstderr`, 'utf8'))
  assert.ok(checked.length >= 20)
  assert.equal(await filesEqual(ram, dst.memPath), { equal: true })
  const stats = JSON.parse(readFileSync(`${image}.pstats`, 'utf8'))
  assert.ok(stats.requests > 0, JSON.stringify(stats))
  await dst.quit()
})

test('a running guest saved live resumes lazily and keeps running', async () => {
  const src = await w.vm({ name: 'run-src', memMiB: 128, kernel: buildGuest(), paused: false })
  for (let i = 0; (await src.readGuest(GUEST_STATUS_ADDR + 4, 4)).readUInt32LE(0) === 0; i++) {
    if (i > 400) throw new Error(`guest did not start\n${src.stderr}`)
    await new Promise((r) => setTimeout(r, 50))
  }
  const image = w.path('running.snap')
  await execCreate(w, src, image)
  const saved = await src.readGuest(GUEST_STATUS_ADDR, 8)
  await src.quit()

  const dst = await w.vm({ name: 'run-dst', memMiB: 128, incoming: 'defer', paused: false })
  const status = `${image}.postcopy-status`
  await dst.migrateIncoming(execUri(`load --postcopy ${image}`, status, `${image}.pstderr`), { capabilities: { 'postcopy-ram': true } })
  const done = await dst.waitMigration({ timeoutMs: 120_000 })
  assert.is(done.status, 'completed', `${JSON.stringify(done)} ${existsSync(`${image}.pstderr`) ? readFileSync(`${image}.pstderr`, 'utf8') : ''}`)
  assert.is(await waitStatus(status), 0, readFileSync(`${image}.pstderr`, 'utf8'))
  assert.is((await dst.status()).status, 'running')
  const h1 = (await dst.readGuest(GUEST_STATUS_ADDR + 4, 4)).readUInt32LE(0)
  await new Promise((r) => setTimeout(r, 300))
  const h2 = (await dst.readGuest(GUEST_STATUS_ADDR + 4, 4)).readUInt32LE(0)
  assert.ok(h1 >= saved.readUInt32LE(4), `heartbeat went back: saved ${saved.readUInt32LE(4)}, restored ${h1}`)
  assert.ok(h2 > h1, `guest not running after lazy restore: heartbeat ${h1} -> ${h2}`)
})

test.run()
