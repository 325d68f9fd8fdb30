// A full disk and concurrent commands, with real processes: ENOSPC mid-create is SNAP_NO_SPACE
// and leaves the older image as it was; a create in progress locks the path against a second
// create, a load, a verify (SNAP_LOCKED); several loads of one image at once all work, even
// when they race to rebuild a missing index, and so do two exec: restores into two QEMUs.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { execFileSync, spawn } from 'node:child_process'
import { mkdirSync, readFileSync, readdirSync, rmSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { setTimeout as sleep } from 'node:timers/promises'
import { fillRam, filesEqual } from '../../tools/vm.js'
import { MiB, SNAPCTL_BIN, Workdir, execLoad, parseJson, snapctl } from './helpers.js'

const w = new Workdir('faults')
const fixture = join(dirname(fileURLToPath(import.meta.url)), '../../../test/fixtures/qemu10-pc-16M.stream')
const mnt = w.path('small')
let mounted = false
const ram = w.path('src.ram')
const stream = w.path('random.stream')

test.before(async () => {
  // 64 MiB of incompressible RAM: a stream (and an image) larger than the 48 MiB mount.
  await fillRam(ram, 64 * MiB, { seed: 9, mix: { random: 100, text: 0, pattern: 0, zero: 0 } })
  const vm = await w.vm({ name: 'faults-src', memMiB: 64, memPath: ram })
  await vm.migrate(`file:${stream}`)
  assert.is((await vm.waitMigration()).status, 'completed')
  await vm.quit()
})
test.after(async () => {
  if (mounted) execFileSync('umount', [mnt])
  await w.cleanup()
})

const codeOf = (r: { stderr: string }): string | undefined => /^snapctl: (SNAP_[A-Z_]+): /m.exec(r.stderr)?.[1]

test('disk full: SNAP_NO_SPACE (exit 6), no partial file left, the older image untouched', async () => {
  mkdirSync(mnt)
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=48M', 'tmpfs', mnt])
  mounted = true
  const image = join(mnt, 'vm.snap')
  const made = await snapctl(['create', image, '--from', fixture])
  assert.is(made.code, 0, made.stderr)
  const before = readFileSync(image)

  const r = await snapctl(['create', image, '--from', stream, '--force'])
  assert.is(r.code, 6, r.stderr)
  assert.is(codeOf(r), 'SNAP_NO_SPACE')
  assert.equal(readdirSync(mnt).filter((f) => f.includes('partial')), [])
  assert.ok(readFileSync(image).equals(before), 'the older image changed')
  const v = await snapctl(['verify', image])
  assert.is(v.code, 0, v.stderr)
})

/** A create reading its stream from a pipe we feed: it runs for as long as we hold the rest back. */
async function slowCreate(image: string, extra: string[] = []) {
  const child = spawn(process.execPath, [SNAPCTL_BIN, 'create', image, ...extra], { stdio: ['pipe', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (d: Buffer) => (stderr += d))
  const exited = new Promise<number | null>((res) => child.on('close', res))
  const data = readFileSync(stream)
  child.stdin.write(data.subarray(0, 8 * MiB))
  const partial = `.${image.split('/').pop()}.partial-${child.pid}`
  for (let i = 0; !readdirSync(dirname(image)).includes(partial); i++) {
    if (i > 500) throw new Error(`the create did not start: ${stderr}`)
    await sleep(10)
  }
  return {
    pid: child.pid!,
    finish: async (): Promise<{ code: number | null; stderr: string }> => {
      child.stdin.end(data.subarray(8 * MiB))
      return { code: await exited, stderr }
    },
  }
}

test('a running create locks its path: a second create, load, verify and info say SNAP_LOCKED', async () => {
  const image = w.path('busy.snap')
  const a = await slowCreate(image)
  const second = await snapctl(['create', image, '--from', fixture, '--force'])
  assert.is(second.code, 5, second.stderr)
  assert.is(codeOf(second), 'SNAP_LOCKED')
  for (const args of [['load', image, '--to', w.path('busy.stream')], ['verify', image], ['info', image]]) {
    const r = await snapctl(args)
    assert.is(r.code, 5, `${args[0]}: ${r.stderr}`)
    assert.is(codeOf(r), 'SNAP_LOCKED', args[0])
  }
  const done = await a.finish()
  assert.is(done.code, 0, done.stderr)
  assert.is((await snapctl(['verify', image])).code, 0)

  // Replacing it (--force): info still describes the old image and names the running create.
  const b = await slowCreate(image, ['--force'])
  const info = parseJson(await snapctl(['info', image, '--json']))
  assert.is(info.complete, true)
  assert.equal(info.createRunning, [b.pid])
  const load = await snapctl(['load', image, '--to', w.path('busy2.stream')])
  assert.is(codeOf(load), 'SNAP_LOCKED')
  assert.is((await b.finish()).code, 0)
  assert.is((await snapctl(['verify', image])).code, 0)
})

test('four loads of one image at once, with the index present and with it missing: all identical', async () => {
  const image = w.path('shared.snap')
  assert.is((await snapctl(['create', image, '--from', stream])).code, 0)
  const ref = w.path('ref.stream')
  assert.is((await snapctl(['load', image, '--to', ref])).code, 0)
  const want = readFileSync(ref)
  for (const round of ['present', 'missing']) {
    if (round === 'missing') rmSync(`${image}.index`, { recursive: true })
    const outs = [0, 1, 2, 3].map((i) => w.path(`par-${round}-${i}.stream`))
    const rs = await Promise.all(outs.map((o) => snapctl(['load', image, '--to', o])))
    rs.forEach((r, i) => {
      assert.is(r.code, 0, `${round} load ${i}: ${r.stderr}`)
      assert.ok(readFileSync(outs[i]).equals(want), `${round} load ${i} wrote another stream`)
    })
    assert.equal(readdirSync(w.dir).filter((f) => /\.index\.(tmp|old)-/.test(f)), [], 'index build leftovers')
    const v = await snapctl(['verify', image, '--json'])
    assert.is(v.code, 0, v.stdout.toString())
    assert.is(parseJson(v).index, 'ok')
  }
})

test('two exec: restores of one image into two QEMUs at once, both rebuilding its index: byte-identical', async () => {
  const image = w.path('twice.snap')
  assert.is((await snapctl(['create', image, '--from', stream])).code, 0)
  rmSync(`${image}.index`, { recursive: true })
  const dsts = await Promise.all(['dst1', 'dst2'].map((name) => w.vm({ name, memMiB: 64, incoming: 'defer', keepMem: true })))
  await Promise.all(dsts.map((d) => execLoad(d, image)))
  for (const d of dsts) assert.equal(await filesEqual(ram, d.memPath), { equal: true }, d.name)
  await Promise.all(dsts.map((d) => d.quit()))
  assert.is(parseJson(await snapctl(['verify', image, '--json'])).index, 'ok')
})

test.run()
