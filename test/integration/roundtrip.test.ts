// The product's main job against real QEMU 10 (TCG): save with `migrate exec:snapctl create`,
// restore with `migrate-incoming exec:snapctl load`, and prove the guest RAM came back byte for
// byte (the destination's RAM is a file on /dev/shm that we compare with the source's).
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { copyFileSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fillRam, filesEqual, type Vm } from '../../tools/vm.js'
import { makeLibvirtHeader } from '../../src/stream/libvirt.js'
import { MiB, Workdir, execCreate, execLoad, parseJson, snapctl } from './helpers.js'

const w = new Workdir('roundtrip')
let source: Vm
let sourceRam: string
const image = w.path('vm.snap')

test.before(async () => {
  sourceRam = w.path('source.ram')
  await fillRam(sourceRam, 256 * MiB, { seed: 7 })
  source = await w.vm({ name: 'src', memMiB: 256, memPath: sourceRam, vga: true })
})
test.after(() => w.cleanup())

async function restoreAndCompare(name: string, image: string, extra = ''): Promise<void> {
  const dst = await w.vm({ name, memMiB: 256, incoming: 'defer', vga: true, keepMem: true })
  await execLoad(dst, image, extra)
  assert.equal(await filesEqual(sourceRam, dst.memPath), { equal: true }, `${name}: restored RAM differs`)
  await dst.quit()
}

test('paused VM with VGA: exec:snapctl create, verify, exec:snapctl load restore it byte for byte', async () => {
  await execCreate(w, source, image, `--stats ${image}.stats`)
  assert.is((statSync(image).mode & 0o777).toString(8), '600')
  const v = await snapctl(['verify', image, '--json'])
  assert.is(v.code, 0, v.stderr)
  assert.is(parseJson(v).ok, true)
  const info = parseJson(await snapctl(['info', image, '--json']))
  assert.is(info.complete, true)
  assert.is(info.machine, 'pc-i440fx-10.0')
  const names = info.ramBlocks.map((b: { name: string }) => b.name)
  assert.ok(names.includes('mem'), names.join(','))
  assert.ok(names.includes('0000:00:02.0/vga.vram'), names.join(','))
  const mem = info.ramBlocks.find((b: { name: string }) => b.name === 'mem')
  assert.is(mem.size, 256 * MiB)
  assert.is(mem.zeroPages + mem.storedPages, mem.pages)
  assert.is(mem.pages, mem.ramPages, 'a paused VM sends every page')
  assert.ok(mem.zeroPages > 0 && mem.storedPages > 0)
  assert.is(info.deadBytes, 0)
  const stats = JSON.parse(readFileSync(`${image}.stats`, 'utf8'))
  assert.ok(stats.stream.pageRecords + stats.stream.zeroRecords >= mem.ramPages, JSON.stringify(stats))
  assert.is(stats.stream.resentRecords, 0)
  assert.equal([stats.pages, stats.storedPages, stats.zeroPages], [info.pages, info.storedPages, info.zeroPages], 'one vocabulary: --stats and info --json agree')
  assert.equal(info.stream, stats.stream)
  await restoreAndCompare('dst-precopy', image)
})

test('a copy of the image alone (no index) restores identically: the index is rebuilt', async () => {
  const dir = w.path('backup')
  mkdirSync(dir)
  const copy = join(dir, 'vm.snap')
  copyFileSync(image, copy)
  assert.not.ok(existsSync(`${copy}.index`))
  await restoreAndCompare('dst-copy', copy)
  assert.ok(existsSync(`${copy}.index`), 'load rebuilt the index beside the copy')
})

test('create --from a `migrate file:` stream and from a libvirt save image', async () => {
  // A VM paused by a finished migration cannot be migrated again: boot a new one on the same RAM.
  await source.quit()
  source = await w.vm({ name: 'src2', memMiB: 256, memPath: sourceRam, vga: true })
  const stream = w.path('qemu.stream')
  await source.migrate(`file:${stream}`)
  assert.is((await source.waitMigration()).status, 'completed')
  const fromStream = w.path('from-stream.snap')
  const r = await snapctl(['create', fromStream, '--from', stream])
  assert.is(r.code, 0, r.stderr)
  await restoreAndCompare('dst-from-stream', fromStream)

  const libvirt = w.path('libvirt.save')
  const header = makeLibvirtHeader('<domain type="kvm"><name>vm1</name></domain>', { wasRunning: false })
  writeFileSync(libvirt, Buffer.concat([header, readFileSync(stream)]))
  const fromLibvirt = w.path('from-libvirt.snap')
  const r2 = await snapctl(['create', fromLibvirt, '--from', libvirt, '--json'])
  assert.is(r2.code, 0, r2.stderr)
  assert.is(parseJson(r2).source, 'libvirt')
  await restoreAndCompare('dst-from-libvirt', fromLibvirt)
})

test('load --to writes a plain stream that QEMU restores with migrate-incoming file:', async () => {
  const out = w.path('exported.stream')
  const r = await snapctl(['load', image, '--to', out])
  assert.is(r.code, 0, r.stderr)
  assert.is(r.stdout.length, 0, 'nothing on stdout with --to')
  const dst = await w.vm({ name: 'dst-file', memMiB: 256, incoming: 'defer', vga: true, keepMem: true })
  await dst.migrateIncoming(`file:${out}`)
  assert.is((await dst.waitMigration()).status, 'completed')
  assert.equal(await filesEqual(sourceRam, dst.memPath), { equal: true })
  await dst.quit()
})

test('an existing image is refused without --force', async () => {
  const r = await snapctl(['create', image, '--from', w.path('qemu.stream')])
  assert.is(r.code, 5)
  assert.match(r.stderr, /SNAP_EXISTS/)
})

test.run()
