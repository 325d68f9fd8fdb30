// `snapctl save` and `snapctl restore` against real QEMU, over a second QMP socket of each VM
// (the harness keeps the first): round trips of a paused VM (eager and lazy, RAM compared byte
// for byte), a live save of a running guest that runs on, and the failures: a full disk, QEMU
// killed mid-save, SIGTERM mid-save (no image, the VM runs again, settings restored), a
// destination with other RAM and one whose RAM cannot do postcopy (refused before anything is
// sent: the destination still waits). Codes are asserted, not messages.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { execFileSync, spawn } from 'node:child_process'
import { mkdirSync, readdirSync, statfsSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { buildGuest, fillRam, filesEqual, GUEST_STATUS_ADDR, type Vm, type VmOptions } from '../../tools/vm.js'
import { MiB, SNAPCTL_BIN, Workdir, parseJson, snapctl, type RunResult } from './helpers.js'

const w = new Workdir('save-restore')
const mnt = w.path('small')
let mounted = false
test.after(async () => {
  if (mounted) execFileSync('umount', [mnt])
  await w.cleanup()
})

const codeOf = (r: { stderr: string }): string | undefined => /^snapctl: (SNAP_[A-Z_]+): /m.exec(r.stderr)?.[1]

/** A VM with a second QMP socket for snapctl (one client per socket; the harness holds the first). */
async function vm(opts: VmOptions): Promise<{ vm: Vm; sock: string }> {
  const sock = w.path(`${opts.name}-snapctl.qmp`)
  const v = await w.vm({ ...opts, extraArgs: [...(opts.extraArgs ?? []), '-qmp', `unix:${sock},server=on,wait=off`] })
  return { vm: v, sock }
}

/** Nothing but finished images and their indexes in `dir`: no work directory, no partial file. */
function leftovers(dir: string): string[] {
  return readdirSync(dir).filter((f) => f.includes('.save-') || f.includes('.partial-'))
}

async function capabilitiesOn(v: Vm): Promise<string[]> {
  const caps = await v.qmp.execute<Array<{ capability: string; state: boolean }>>('query-migrate-capabilities')
  return caps.filter((c) => c.state).map((c) => c.capability)
}

async function heartbeat(v: Vm): Promise<number> {
  return (await v.readGuest(GUEST_STATUS_ADDR + 4, 4)).readUInt32LE(0)
}

async function waitHeartbeat(v: Vm): Promise<void> {
  for (let i = 0; (await heartbeat(v)) === 0; i++) {
    if (i > 400) throw new Error(`guest did not start\n${v.stderr}`)
    await sleep(50)
  }
}

/** snapctl running in the background; resolves like snapctl() once it has exited. */
function background(args: string[]): { pid: number; done: Promise<RunResult> } {
  const child = spawn(process.execPath, [SNAPCTL_BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (d: Buffer) => (stdout += d))
  child.stderr.on('data', (d: Buffer) => (stderr += d))
  const done = new Promise<RunResult>((res) => child.on('close', (code) => res({ code, stdout: Buffer.from(stdout), stderr })))
  return { pid: child.pid!, done }
}

/** Waits until QEMU has sent `bytes` of RAM; fails if the migration ended first. */
async function waitTransferred(v: Vm, bytes: number): Promise<void> {
  const info = await v.waitMigration({ done: (i) => i.ram?.transferred >= bytes, timeoutMs: 60_000 })
  assert.ok(!['completed', 'failed', 'cancelled'].includes(info.status), `the migration ended before ${bytes} bytes: ${JSON.stringify(info)}`)
}

test('a paused VM saved, restored eagerly and lazily: RAM byte-identical, settings as they were', async () => {
  const ram = w.path('paused.ram')
  await fillRam(ram, 64 * MiB, { seed: 31 })
  const src = await vm({ name: 'rt-src', memMiB: 64, memPath: ram, vga: true })
  const image = w.path('paused.snap')
  const saved = await snapctl(['save', image, '--qmp', src.sock, '--json'])
  assert.is(saved.code, 0, saved.stderr)
  const r = parseJson(saved)
  assert.is(r.image, image)
  assert.is(r.vm, 'paused')
  assert.is(r.live, false)
  assert.is(r.downtimeMs, null) // it was never running
  assert.is(r.downtime, null)
  assert.is(r.bytes, r.fileBytes)
  assert.type(r.seconds, 'number')
  assert.ok(r.pages >= (64 * MiB) / 4096 && r.zeroPages > 0 && r.fileBytes > 0 && r.bytesIn > r.fileBytes, JSON.stringify(r))
  assert.equal(await src.vm.status(), { status: 'postmigrate', running: false })
  assert.equal(leftovers(w.dir), [])
  assert.is((await snapctl(['verify', image])).code, 0)

  const eager = await vm({ name: 'rt-eager', memMiB: 64, incoming: 'defer', vga: true, keepMem: true })
  const e = await snapctl(['restore', image, '--qmp', eager.sock, '--paused', '--json'])
  assert.is(e.code, 0, e.stderr)
  assert.is(parseJson(e).vm, 'paused')
  assert.is(parseJson(e).channels, 2, 'an eager restore goes over 2 multifd channels by default')
  assert.equal(await filesEqual(ram, eager.vm.memPath), { equal: true })
  assert.is((await eager.vm.waitMigration()).status, 'completed')
  assert.equal(await capabilitiesOn(eager.vm), [], 'multifd is off again')

  // --channels 0: the single exec: pipe.
  const pipe = await vm({ name: 'rt-exec', memMiB: 64, incoming: 'defer', vga: true, keepMem: true })
  const p = await snapctl(['restore', image, '--qmp', pipe.sock, '--paused', '--channels', '0', '--json'])
  assert.is(p.code, 0, p.stderr)
  assert.is(parseJson(p).channels, 0)
  assert.equal(await filesEqual(ram, pipe.vm.memPath), { equal: true })
  await pipe.vm.quit()

  const lazy = await vm({ name: 'rt-lazy', memMiB: 64, incoming: 'defer', vga: true, keepMem: true })
  const l = await snapctl(['restore', image, '--qmp', lazy.sock, '--lazy', '--paused', '--json'])
  assert.is(l.code, 0, l.stderr)
  const lr = parseJson(l)
  assert.is(lr.lazy, true)
  assert.ok(lr.postcopyActiveSeconds > 0 && lr.runnableSeconds >= lr.postcopyActiveSeconds && lr.seconds >= lr.runnableSeconds, JSON.stringify(lr))
  assert.ok(lr.lastPageSeconds >= lr.runnableSeconds && lr.lastPageSeconds <= lr.seconds && lr.bytes === lr.bytesOut && lr.bytes > 0, JSON.stringify(lr))
  assert.equal(await filesEqual(ram, lazy.vm.memPath), { equal: true })
  assert.equal(await capabilitiesOn(lazy.vm), [], 'postcopy-ram is off again')
  await Promise.all([src.vm.quit(), eager.vm.quit(), lazy.vm.quit()])
})

test('--live --resume: a running guest is saved while it runs and runs on; its restore runs too', async () => {
  const kernel = buildGuest()
  const src = await vm({ name: 'live-src', memMiB: 64, kernel, paused: false, append: 'hot=4 sweep=4' })
  await waitHeartbeat(src.vm)
  await src.vm.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 8 * MiB })
  const image = w.path('live.snap')
  const saved = await snapctl(['save', image, '--qmp', src.sock, '--live', '--resume', '--json'])
  assert.is(saved.code, 0, saved.stderr)
  const r = parseJson(saved)
  assert.is(r.live, true)
  assert.is(r.vm, 'running')
  assert.type(r.downtimeMs, 'number')
  assert.is(r.downtime, r.downtimeMs)
  assert.is((await src.vm.status()).status, 'running')
  const h1 = await heartbeat(src.vm)
  await sleep(300)
  assert.ok((await heartbeat(src.vm)) > h1, 'the source guest does not run on')
  const params = await src.vm.qmp.execute<Record<string, unknown>>('query-migrate-parameters')
  assert.is(params['max-bandwidth'], 8 * MiB, 'max-bandwidth restored')

  const dst = await vm({ name: 'live-dst', memMiB: 64, incoming: 'defer' })
  const e = await snapctl(['restore', image, '--qmp', dst.sock])
  assert.is(e.code, 0, e.stderr)
  assert.is((await dst.vm.status()).status, 'running')
  const d1 = await heartbeat(dst.vm)
  await sleep(300)
  assert.ok((await heartbeat(dst.vm)) > d1, 'the restored guest does not run')
  await Promise.all([src.vm.quit(), dst.vm.quit()])
})

test('a full disk: SNAP_NO_SPACE, nothing at the path, the VM runs again, capabilities and bandwidth restored', async () => {
  mkdirSync(mnt)
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=32M', 'tmpfs', mnt])
  mounted = true
  const ram = w.path('random.ram')
  await fillRam(ram, 64 * MiB, { seed: 32, mix: { random: 100, text: 0, pattern: 0, zero: 0 } })
  const src = await vm({ name: 'full-src', memMiB: 64, memPath: ram, paused: false })
  await src.vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] })
  const before = await src.vm.qmp.execute<Record<string, unknown>>('query-migrate-parameters')
  const r = await snapctl(['save', join(mnt, 'vm.snap'), '--qmp', src.sock])
  assert.is(r.code, 6, r.stderr)
  assert.is(codeOf(r), 'SNAP_NO_SPACE')
  assert.equal(readdirSync(mnt), [])
  assert.is((await src.vm.status()).status, 'running')
  assert.equal(await capabilitiesOn(src.vm), ['multifd'])
  const after = await src.vm.qmp.execute<Record<string, unknown>>('query-migrate-parameters')
  assert.is(after['max-bandwidth'], before['max-bandwidth'])
  assert.ok(['failed', 'cancelled'].includes((await src.vm.qmp.execute<{ status: string }>('query-migrate')).status))
  await src.vm.quit()
})

test('QEMU killed mid-save: SNAP_QEMU_GONE, no image; SIGTERM mid-save: SNAP_ABORTED, no image, the VM runs again', async () => {
  const ram = w.path('big.ram')
  await fillRam(ram, 256 * MiB, { seed: 33, mix: { random: 100, text: 0, pattern: 0, zero: 0 } })
  const a = await vm({ name: 'kill-src', memMiB: 256, memPath: ram })
  const killed = w.path('killed.snap')
  const save = background(['save', killed, '--qmp', a.sock])
  await waitTransferred(a.vm, 24 * MiB)
  a.vm.kill('SIGKILL')
  const r = await save.done
  assert.is(r.code, 10, r.stderr)
  assert.is(codeOf(r), 'SNAP_QEMU_GONE')
  assert.not.ok(readdirSync(w.dir).includes('killed.snap'))
  assert.equal(leftovers(w.dir), [])
  await a.vm.quit()

  const b = await vm({ name: 'term-src', memMiB: 256, memPath: ram, paused: false })
  const stopped = w.path('stopped.snap')
  const save2 = background(['save', stopped, '--qmp', b.sock])
  await waitTransferred(b.vm, 24 * MiB)
  process.kill(save2.pid, 'SIGTERM')
  const r2 = await save2.done
  assert.is(r2.code, 9, r2.stderr)
  assert.is(codeOf(r2), 'SNAP_ABORTED')
  assert.not.ok(readdirSync(w.dir).includes('stopped.snap'))
  assert.equal(leftovers(w.dir), [])
  assert.is((await b.vm.status()).status, 'running')
  assert.is((await b.vm.qmp.execute<{ status: string }>('query-migrate')).status, 'cancelled')
  await b.vm.quit()
})

/** A directory on a filesystem that is not tmpfs (userfaultfd cannot fill a file there). */
function diskDir(): string {
  for (const d of [w.dir, '/var/tmp', dirname(SNAPCTL_BIN)]) {
    if (Number(statfsSync(d).type) !== 0x01021994) return d
  }
  throw new Error('no directory off tmpfs for the postcopy refusal test')
}

test('restore refuses before anything is sent: other RAM size, RAM that cannot do postcopy, no -incoming', async () => {
  const ram = w.path('small.ram')
  await fillRam(ram, 32 * MiB, { seed: 34 })
  const src = await vm({ name: 'ref-src', memMiB: 32, memPath: ram })
  const image = w.path('small.snap')
  assert.is((await snapctl(['save', image, '--qmp', src.sock])).code, 0)

  const other = await vm({ name: 'ref-other', memMiB: 48, incoming: 'defer' })
  const r = await snapctl(['restore', image, '--qmp', other.sock])
  assert.is(r.code, 10, r.stderr)
  assert.is(codeOf(r), 'SNAP_RAM_MISMATCH')
  assert.is((await other.vm.status()).status, 'inmigrate')
  assert.equal(await other.vm.qmp.execute('query-migrate'), {}, 'no migration started')

  const onDisk = await vm({ name: 'ref-disk', memMiB: 32, incoming: 'defer', memPath: join(diskDir(), `snapctl-ref-disk-${process.pid}.ram`), keepMem: false })
  const l = await snapctl(['restore', image, '--qmp', onDisk.sock, '--lazy'])
  assert.is(l.code, 8, l.stderr)
  assert.is(codeOf(l), 'SNAP_POSTCOPY_SETUP')
  assert.is((await onDisk.vm.status()).status, 'inmigrate')
  assert.equal(await onDisk.vm.qmp.execute('query-migrate'), {}, 'no migration started')
  assert.equal(await capabilitiesOn(onDisk.vm), [])
  // The same destination takes the image eagerly.
  const e = await snapctl(['restore', image, '--qmp', onDisk.sock, '--paused'])
  assert.is(e.code, 0, e.stderr)
  assert.equal(await filesEqual(ram, onDisk.vm.memPath), { equal: true })

  const n = await snapctl(['restore', image, '--qmp', src.sock])
  assert.is(codeOf(n), 'SNAP_VM_STATE')
  await Promise.all([src.vm.quit(), other.vm.quit(), onDisk.vm.quit()])
})

test.run()
