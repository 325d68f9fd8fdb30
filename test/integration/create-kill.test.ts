// `snapctl create` SIGKILLed at five points of a real migration of a running guest (right at
// start, at 10%, 50% and 90% of the first pass, and once QEMU has sent everything and waits for
// snapctl to finish): QEMU reports the migration failed (at the last point it may say
// `completed`), the guest keeps running and can be saved again, nothing at the
// image path is accepted by info, verify or load, and the next create of the name removes the
// dead process's `.NAME.partial-PID`.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { existsSync, readFileSync, readdirSync, rmSync } from 'node:fs'
import { setTimeout as sleep } from 'node:timers/promises'
import { GUEST_STATUS_ADDR, GUEST_STATUS_MAGIC, buildGuest, fillRam, type Vm } from '../../tools/vm.js'
import { MiB, SNAPCTL, Workdir, parseJson, snapctl, waitStatus } from './helpers.js'

const w = new Workdir('kill')
let vm: Vm
test.after(() => w.cleanup())

const heartbeat = async (): Promise<number> => (await vm.readGuest(GUEST_STATUS_ADDR + 4, 4)).readUInt32LE(0)

test.before(async () => {
  // Random RAM (the guest only dirties its hot region), so that every pass moves real bytes.
  const ram = w.path('src.ram')
  await fillRam(ram, 64 * MiB, { seed: 5, mix: { random: 100, text: 0, pattern: 0, zero: 0 } })
  vm = await w.vm({ name: 'kill-src', memMiB: 64, memPath: ram, kernel: buildGuest(), paused: false, append: 'hot=2 sweep=4' })
  // The RAM starts random: wait for the guest's magic, not for a nonzero heartbeat.
  for (let i = 0; (await vm.readGuest(GUEST_STATUS_ADDR, 4)).readUInt32LE(0) !== GUEST_STATUS_MAGIC; i++) {
    if (i > 400) throw new Error(`guest did not start\n${vm.stderr}`)
    await sleep(50)
  }
})

function partials(name: string): string[] {
  return readdirSync(w.dir).filter((f) => f.startsWith(`.${name}.partial-`))
}

/** Starts `migrate exec:snapctl create`, with the node process's pid written to a file. */
async function startCreate(name: string, parameters: Record<string, unknown>): Promise<{ image: string; pid: () => Promise<number>; status: string }> {
  const image = w.path(name)
  const pidFile = `${image}.pid`
  const status = `${image}.status`
  rmSync(pidFile, { force: true })
  rmSync(status, { force: true })
  await vm.migrate(`exec:sh -c 'echo $$ > ${pidFile}; exec ${SNAPCTL} create ${image}' 2>${image}.stderr; echo $? > ${status}`, { parameters })
  const pid = async (): Promise<number> => {
    for (let i = 0; i < 500; i++) {
      const text = existsSync(pidFile) ? readFileSync(pidFile, 'utf8') : ''
      if (text.endsWith('\n')) return Number(text)
      await sleep(5)
    }
    throw new Error('snapctl create did not start')
  }
  return { image, pid, status }
}

const firstPass = (i: any): number => (i.ram?.total ? 1 - i.ram.remaining / i.ram.total : 0)

async function errorCode(args: string[]): Promise<string> {
  const r = await snapctl([...args, '--json'])
  if (r.code === 0) return 'ok'
  const j = parseJson(r)
  return j.error?.code ?? j.problems[0].code // verify reports damage, other errors are errors
}

/** Nothing at the path is an image, and no partial file passes for one. */
async function nothingAccepted(image: string, name: string): Promise<void> {
  assert.not.ok(existsSync(image), `${image} exists`)
  assert.is(await errorCode(['info', image]), 'SNAP_NOT_FOUND')
  assert.is(await errorCode(['verify', image]), 'SNAP_NOT_FOUND')
  const load = await snapctl(['load', image, '--to', `${image}.stream`])
  assert.is(load.code, 2, load.stderr)
  assert.match(load.stderr, /^snapctl: SNAP_NOT_FOUND: /)
  for (const p of partials(name)) {
    const path = w.path(p)
    const info = parseJson(await snapctl(['info', path, '--json']))
    assert.is(info.complete, false, `${p}: ${JSON.stringify(info)}`)
    assert.is(await errorCode(['verify', path]), 'SNAP_INCOMPLETE')
    const l = await snapctl(['load', path, '--to', `${path}.stream`])
    assert.is(l.code, 3, l.stderr)
    assert.match(l.stderr, /^snapctl: SNAP_INCOMPLETE: /)
  }
}

async function stillRunning(): Promise<void> {
  assert.is((await vm.status()).status, 'running')
  const h1 = await heartbeat()
  const seen: number[] = []
  for (let i = 0; i < 50 && (seen.at(-1) ?? h1) <= h1; i++) {
    await sleep(100)
    seen.push(await heartbeat())
  }
  assert.ok(seen.at(-1)! > h1, `the guest heartbeat did not advance: ${h1} -> ${seen.join(' ')} (${JSON.stringify(await vm.status())})`)
}

const POINTS: Array<[string, number]> = [['start', -1], ['10pct', 0.1], ['50pct', 0.5], ['90pct', 0.9]]
for (const [label, at] of POINTS) {
  test(`SIGKILL at ${label}: migration failed, guest running, no image accepted`, async () => {
    const name = `kill-${label}.snap`
    const c = await startCreate(name, { 'max-bandwidth': 32 * MiB, 'downtime-limit': 1 })
    if (at >= 0) {
      const info = await vm.waitMigration({ done: (i) => firstPass(i) >= at, timeoutMs: 60_000 })
      assert.is(info.status, 'active', `the migration ended before ${label}: ${JSON.stringify(info)}`)
    }
    process.kill(await c.pid(), 'SIGKILL')
    const info = await vm.waitMigration({ timeoutMs: 60_000 })
    assert.is(info.status, 'failed', JSON.stringify(info))
    assert.is(await waitStatus(c.status), 128 + 9)
    if (at >= 0) assert.is(partials(name).length, 1, 'the killed create left its partial file')
    await stillRunning()
    await nothingAccepted(c.image, name)
  })
}

test('the guest is then saved successfully, and that create removes the dead partial file', async () => {
  const name = 'kill-50pct.snap'
  assert.is(partials(name).length, 1)
  const c = await startCreate(name, { 'max-bandwidth': 1024 * MiB, 'downtime-limit': 5000 })
  const info = await vm.waitMigration({ timeoutMs: 120_000 })
  assert.is(info.status, 'completed', JSON.stringify(info))
  assert.is(await waitStatus(c.status), 0, readFileSync(`${c.image}.stderr`, 'utf8'))
  assert.equal(partials(name), [])
  assert.is((await snapctl(['verify', c.image])).code, 0)
})

// QEMU 10 reaps its exec: child before it reports `completed`: the window in which snapctl is
// still finishing the image is while QEMU has left `active` (the guest is stopped, the last
// bytes are sent) and waits for snapctl to exit. Killed there, QEMU may still say `completed`.
test('SIGKILL after QEMU has sent everything, while snapctl finishes: a whole image or nothing', async () => {
  await vm.qmp.execute('cont') // out of postmigrate
  const name = 'kill-done.snap'
  const c = await startCreate(name, { 'max-bandwidth': 1024 * MiB, 'downtime-limit': 5000 })
  const pid = await c.pid()
  await vm.waitMigration({ done: (i) => i.status !== 'active' && i.status !== 'setup', timeoutMs: 120_000 })
  try {
    process.kill(pid, 'SIGKILL')
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ESRCH') throw e // it had finished already
  }
  const info = await vm.waitMigration({ timeoutMs: 120_000 })
  const code = await waitStatus(c.status)
  assert.ok(code === 0 || code === 128 + 9, `exit ${code}`)
  assert.ok(info.status === 'completed' || info.status === 'failed', JSON.stringify(info))
  if (code === 0) {
    assert.is(info.status, 'completed')
    assert.is((await snapctl(['verify', c.image])).code, 0)
  } else if (existsSync(c.image)) {
    const v = parseJson(await snapctl(['verify', c.image, '--json']))
    assert.is(v.imageOk, true, JSON.stringify(v.problems))
  } else {
    await nothingAccepted(c.image, name)
  }
})

test.run()
