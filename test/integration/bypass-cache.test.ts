// --bypass-cache against real QEMU: a paused VM saved and restored with it comes back byte for
// byte, and the image is (almost) not in the host's page cache afterwards (fincore, util-linux);
// the same image read without it is, so the measure can fail. On a filesystem that refuses
// O_DIRECT (ramfs) create and load go through the page cache with a one-line note, as
// documented (src/container/direct-io.ts). And the flags' --help text.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { execFileSync } from 'node:child_process'
import { copyFileSync, mkdirSync, readFileSync, statfsSync } from 'node:fs'
import { fillRam, filesEqual, type VmOptions, type Vm } from '../../tools/vm.js'
import { MiB, Workdir, parseJson, snapctl } from './helpers.js'

const w = new Workdir('bypass-cache')
const ramfs = w.path('ramfs')
let mounted = false
test.after(async () => {
  if (mounted) execFileSync('umount', [ramfs])
  await w.cleanup()
})

const TMPFS_MAGIC = 0x01021994
const RAMFS_MAGIC = 0x858458f6

/** Bytes of `file` resident in the page cache. */
function resident(file: string): number {
  return Number(execFileSync('fincore', ['--bytes', '--noheadings', '--raw', '--output', 'RES', file], { encoding: 'utf8' }).trim())
}

async function vm(opts: VmOptions): Promise<{ vm: Vm; sock: string }> {
  const sock = w.path(`${opts.name}-snapctl.qmp`)
  const v = await w.vm({ ...opts, extraArgs: [...(opts.extraArgs ?? []), '-qmp', `unix:${sock},server=on,wait=off`] })
  return { vm: v, sock }
}

test('save and restore --bypass-cache: RAM byte-identical, the image not in the page cache', async () => {
  // The page cache is the point: a tmpfs work directory would hold the image in it whatever we do.
  assert.is.not(statfsSync(w.dir).type, TMPFS_MAGIC, `${w.dir} is on tmpfs: run this suite with TMPDIR on a disk`)
  const ram = w.path('vm.ram')
  await fillRam(ram, 64 * MiB, { seed: 41 })
  const src = await vm({ name: 'bc-src', memMiB: 64, memPath: ram })
  const image = w.path('vm.snap')
  const saved = await snapctl(['save', image, '--qmp', src.sock, '--bypass-cache', '--sync', '--json'])
  assert.is(saved.code, 0, saved.stderr)
  const fileBytes = parseJson(saved).fileBytes as number
  assert.ok(fileBytes > 8 * MiB, `a ${fileBytes}-byte image is too small to tell`)
  const afterSave = resident(image)

  const dst = await vm({ name: 'bc-dst', memMiB: 64, incoming: 'defer', keepMem: true })
  const r = await snapctl(['restore', image, '--qmp', dst.sock, '--paused', '--bypass-cache'])
  assert.is(r.code, 0, r.stderr)
  assert.not.match(r.stderr, /note: --bypass-cache/)
  assert.equal(await filesEqual(ram, dst.vm.memPath), { equal: true })
  const afterRestore = resident(image)
  // The header, trailer and footer the commands read to check the image may stay: a few blocks.
  assert.ok(afterSave <= fileBytes * 0.05, `after the save ${afterSave} of ${fileBytes} bytes are cached`)
  assert.ok(afterRestore <= fileBytes * 0.05, `after the restore ${afterRestore} of ${fileBytes} bytes are cached`)

  // The control: read without it, the same image is in the page cache.
  const plain = await snapctl(['load', image, '--to', w.path('vm.stream')])
  assert.is(plain.code, 0, plain.stderr)
  assert.ok(resident(image) >= fileBytes * 0.9, `a plain load left only ${resident(image)} of ${fileBytes} bytes cached`)
  await Promise.all([src.vm.quit(), dst.vm.quit()])
})

test('create and load --bypass-cache on ramfs (no O_DIRECT): through the page cache, with a note', async () => {
  mkdirSync(ramfs)
  execFileSync('mount', ['-t', 'ramfs', 'ramfs', ramfs])
  mounted = true
  assert.is(statfsSync(ramfs).type, RAMFS_MAGIC)
  const fixture = w.path('v1.snap')
  copyFileSync('test/fixtures/v1-pc-16M.snap', fixture)
  const stream = w.path('v1.stream')
  assert.is((await snapctl(['load', fixture, '--to', stream])).code, 0)
  const image = `${ramfs}/v1.snap`
  const c = await snapctl(['create', image, '--from', stream, '--bypass-cache', '--sync'])
  assert.is(c.code, 0, c.stderr)
  assert.match(c.stderr, new RegExp(`^snapctl: note: --bypass-cache: the filesystem of ${ramfs} refuses direct I/O`, 'm'))
  assert.is((await snapctl(['verify', image])).code, 0)
  const back = w.path('back.stream')
  const l = await snapctl(['load', image, '--bypass-cache', '--to', back])
  assert.is(l.code, 0, l.stderr)
  assert.match(l.stderr, /^snapctl: note: --bypass-cache: the filesystem of .* refuses direct I\/O/m)
  assert.ok(readFileSync(back).equals(readFileSync(stream)), 'the stream read back differs')
})

test('--help names --bypass-cache for create, load, save and restore', async () => {
  for (const cmd of ['create', 'load', 'save', 'restore']) {
    const h = await snapctl([cmd, '--help'])
    assert.is(h.code, 0, h.stderr)
    assert.match(h.stdout.toString(), /--bypass-cache\s+\S/, `${cmd} --help`)
  }
})

test.run()
