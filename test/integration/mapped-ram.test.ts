// mapped-ram in and out (issue 15, item 5) against real QEMU 10 (TCG): a paused VM saved by QEMU
// itself with `migrate file:F` and capability mapped-ram (once with multifd, 4 channels) is
// imported with `create --from F` and restored with `exec:snapctl load` byte for byte; an image
// exported with `load --to G --format mapped-ram` is restored by QEMU with `migrate-incoming
// file:G` and mapped-ram on (multifd off and on) byte for byte; a libvirt header in front (format
// sparse, as libvirt's parallel save writes it) is imported too. The image is compared with the
// mapped-ram file's allocated bytes on the benchmark's default mix.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { closeSync, openSync, readFileSync, statSync, writeSync } from 'node:fs'
import { fillRam, filesEqual, type Vm } from '../../tools/vm.js'
import { makeLibvirtHeader } from '../../src/stream/libvirt.js'
import { QEMU_SAVE_FORMAT_SPARSE } from '../../src/stream/constants.js'
import { MiB, Workdir, execLoad, parseJson, snapctl } from './helpers.js'

const w = new Workdir('mapped-ram')
const MEM = 128
let sourceRam: string
const mapped = { capabilities: { 'mapped-ram': true } }
const mappedMultifd = { capabilities: { 'mapped-ram': true, multifd: true }, parameters: { 'multifd-channels': 4 } }

test.before(async () => {
  sourceRam = w.path('source.ram')
  await fillRam(sourceRam, MEM * MiB, { seed: 11 })
})
test.after(() => w.cleanup())

/** A paused VM on the filled RAM, saved by QEMU to `file` with mapped-ram (and `opts`). */
async function qemuSave(name: string, file: string, opts: typeof mapped | typeof mappedMultifd, uri = `file:${file}`): Promise<void> {
  const src = await w.vm({ name, memMiB: MEM, memPath: sourceRam, vga: true })
  await src.migrate(uri, opts)
  const info = await src.waitMigration()
  assert.is(info.status, 'completed', JSON.stringify(info))
  await src.quit()
}

async function restoreExec(name: string, image: string): Promise<void> {
  const dst = await w.vm({ name, memMiB: MEM, incoming: 'defer', vga: true, keepMem: true })
  await execLoad(dst, image)
  assert.equal(await filesEqual(sourceRam, dst.memPath), { equal: true }, `${name}: restored RAM differs`)
  await dst.quit()
}

async function restoreFile(name: string, file: string, opts: typeof mapped | typeof mappedMultifd): Promise<void> {
  const dst: Vm = await w.vm({ name, memMiB: MEM, incoming: 'defer', vga: true, keepMem: true })
  await dst.migrateIncoming(`file:${file}`, opts)
  const info = await dst.waitMigration()
  assert.is(info.status, 'completed', `${JSON.stringify(info)}\n${dst.stderr}`)
  assert.equal(await filesEqual(sourceRam, dst.memPath), { equal: true }, `${name}: restored RAM differs`)
  await dst.quit()
}

const allocated = (path: string): number => statSync(path).blocks * 512

test('QEMU migrate file: with mapped-ram -> create --from -> exec:snapctl load, byte-identical; then --format mapped-ram -> QEMU', async () => {
  const file = w.path('qemu.mapped')
  await qemuSave('src-mapped', file, mapped)
  const image = w.path('from-mapped.snap')
  const r = await snapctl(['create', image, '--from', file, '--json'])
  assert.is(r.code, 0, r.stderr)
  const out = parseJson(r)
  assert.is(out.source, 'qemu')
  assert.is(out.pages, out.ramPages, 'every page of every block is known')
  await restoreExec('dst-exec', image)

  const ratio = allocated(image) / allocated(file)
  // The target is 0.5x; 40% random pages (the default mix) do not compress with LZ4.
  assert.ok(ratio < 0.7, `image/mapped-ram allocated bytes ${ratio}`)
  console.log(`  mapped-ram file: ${statSync(file).size} bytes long, ${allocated(file)} allocated; image ${allocated(image)} allocated: ratio ${ratio.toFixed(3)}`)

  const exported = w.path('exported.mapped')
  const e = await snapctl(['load', image, '--to', exported, '--format', 'mapped-ram'])
  assert.is(e.code, 0, e.stderr)
  assert.is(e.stdout.length, 0)
  assert.ok(allocated(exported) <= allocated(file) * 1.01 + 4 * MiB, `export allocates ${allocated(exported)}, QEMU's file ${allocated(file)}`)
  const noTo = await snapctl(['load', image, '--format', 'mapped-ram'])
  assert.is(noTo.code, 2)
  assert.match(noTo.stderr, /SNAP_USAGE/)
  await restoreFile('dst-file', exported, mapped)
  await restoreFile('dst-file-multifd', exported, mappedMultifd)
})

test('mapped-ram with multifd (4 channels) imports; a libvirt header (format sparse) in front imports too', async () => {
  const file = w.path('qemu-multifd.mapped')
  await qemuSave('src-multifd', file, mappedMultifd)
  const image = w.path('from-multifd.snap')
  const r = await snapctl(['create', image, '--from', file])
  assert.is(r.code, 0, r.stderr)
  await restoreExec('dst-multifd', image)

  // libvirt's parallel save: its header first, then QEMU's file: migration at that offset.
  const header = makeLibvirtHeader('<domain type="kvm"><name>vm1</name></domain>', { format: QEMU_SAVE_FORMAT_SPARSE, padding: 4000 })
  const save = w.path('libvirt.save')
  const fd = openSync(save, 'w')
  writeSync(fd, header)
  closeSync(fd)
  await qemuSave('src-libvirt', save, mapped, `file:${save},offset=${header.length}`)
  assert.ok(readFileSync(save).subarray(0, 16).equals(Buffer.from('LibvirtQemudSave')), 'QEMU left the header alone')
  const fromLibvirt = w.path('from-libvirt.snap')
  const r2 = await snapctl(['create', fromLibvirt, '--from', save, '--json'])
  assert.is(r2.code, 0, r2.stderr)
  assert.is(parseJson(r2).source, 'libvirt')
  await restoreExec('dst-libvirt', fromLibvirt)
})

test.run()
