// Incremental images against real QEMU 10 (TCG): a paused 64 MiB VM saved whole, 5% of its RAM
// changed (new data, data zeroed, zero filled), saved with --base, then again: a chain of 3.
// Restored from the chain eagerly and lazily (postcopy), and flattened: RAM byte-identical each
// time. A base deleted, replaced by another image, or changed (a working set stored in it):
// refused with its code before a byte is written. save --base and restore (eager and --lazy) over
// QMP: the stored base path is relative to where save puts the image.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { copyFileSync, existsSync, mkdirSync, openSync, readFileSync, renameSync, statSync, writeSync, closeSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import { execUri, MiB, Workdir, execCreate, execLoad, parseJson, snapctl, waitStatus } from './helpers.js'
import { fillRam, filesEqual, type Vm, type VmOptions } from '../../tools/vm.js'

const w = new Workdir('incremental')
const RAM = 64 * MiB
const ram = w.path('source.ram')
const img = (n: string) => w.path(`${n}.snap`)

/** Changes `share` of the RAM file's pages in runs of 16: random data, zeroes, or a pattern. */
function change(path: string, share: number, seed: number): void {
  const fd = openSync(path, 'r+')
  try {
    const pages = RAM / 4096
    const runs = Math.round((pages * share) / 16)
    let s = seed
    for (let i = 0; i < runs; i++) {
      s = (Math.imul(s, 1103515245) + 12345) >>> 0
      const first = (s % (pages / 16)) * 16
      const kind = i % 3
      const buf = kind === 0 ? randomBytes(16 * 4096) : kind === 1 ? Buffer.alloc(16 * 4096) : Buffer.alloc(16 * 4096, 0x5a + (i % 7))
      writeSync(fd, buf, 0, buf.length, first * 4096)
    }
  } finally {
    closeSync(fd)
  }
}

async function save(name: string, extra = ''): Promise<void> {
  const vm = await w.vm({ name: `src-${name}`, memMiB: 64, memPath: ram })
  await execCreate(w, vm, img(name), extra)
  await vm.quit()
}

async function restoreEager(name: string, image: string): Promise<void> {
  const dst = await w.vm({ name, memMiB: 64, incoming: 'defer', keepMem: true })
  await execLoad(dst, image)
  assert.equal(await filesEqual(ram, dst.memPath), { equal: true }, `${name}: restored RAM differs`)
  await dst.quit()
}

test.before(async () => {
  await fillRam(ram, RAM, { seed: 15 })
})
test.after(() => w.cleanup())

test('a chain of 3 (5% changed each time): sizes, info, verify, eager and lazy restores byte-identical, flatten', async () => {
  await save('a')
  change(ram, 0.05, 1)
  await save('b', `--base ${img('a')}`)
  change(ram, 0.05, 2)
  await save('c', `--base ${img('b')} --stats ${img('c')}.stats`)
  const full = statSync(img('a')).size
  const sizes = ['b', 'c'].map((n) => statSync(img(n)).size)
  process.stderr.write(`  full ${full} bytes, incremental ${sizes.join(', ')} (${sizes.map((s) => ((100 * s) / full).toFixed(1)).join('%, ')}%)\n`)
  for (const s of sizes) assert.ok(s < 0.12 * full, `incremental ${s} of full ${full}`)

  const info = parseJson(await snapctl(['info', img('c'), '--json']))
  assert.is(info.chain.layers.length, 3)
  assert.is(info.chain.base.path, 'b.snap')
  assert.ok(info.basePages > 0.8 * info.ramPages, JSON.stringify({ basePages: info.basePages, ramPages: info.ramPages }))
  const v = await snapctl(['verify', img('c'), '--json'])
  assert.is(v.code, 0, v.stdout + v.stderr)
  assert.is(parseJson(v).chain.length, 3)

  await restoreEager('dst-eager', img('c'))

  const dst = await w.vm({ name: 'dst-lazy', memMiB: 64, incoming: 'defer', keepMem: true })
  const status = `${img('c')}.lazy-status`
  await dst.migrateIncoming(execUri(`load --postcopy ${img('c')}`, status, `${img('c')}.lazy-stderr`), { capabilities: { 'postcopy-ram': true } })
  const done = await dst.waitMigration({ timeoutMs: 120_000 })
  assert.is(done.status, 'completed', readFileSync(`${img('c')}.lazy-stderr`, 'utf8'))
  assert.is(await waitStatus(status), 0)
  assert.equal(await filesEqual(ram, dst.memPath), { equal: true }, 'lazy restore from the chain differs')
  await dst.quit()

  const f = await snapctl(['flatten', img('c'), img('flat'), '--json'])
  assert.is(f.code, 0, f.stderr)
  assert.is(parseJson(f).layers, 3)
  await restoreEager('dst-flat', img('flat'))
})

test('a base deleted, replaced or changed: refused with its code, nothing written', async () => {
  const out = w.path('out.stream')
  const refused = async (code: string) => {
    const r = await snapctl(['load', img('c'), '--to', out])
    assert.is(r.code, 3, r.stderr)
    assert.match(r.stderr, code)
    assert.not.ok(existsSync(out), 'nothing was written')
    const v = await snapctl(['verify', img('c'), '--json'])
    assert.is(parseJson(v).problems[0].code, code)
  }
  copyFileSync(img('a'), img('a.keep'))
  renameSync(img('a'), w.path('a.gone'))
  await refused('SNAP_BASE_MISSING')
  copyFileSync(img('flat'), img('a'))
  await refused('SNAP_BASE_CHANGED')
  copyFileSync(img('a.keep'), img('a'))
  const ok = await snapctl(['load', img('c'), '--to', out])
  assert.is(ok.code, 0, ok.stderr)
  // A working set stored in the base bumps its generation: the children refuse it.
  const dst = await w.vm({ name: 'dst-record', memMiB: 64, incoming: 'defer' })
  const status = `${img('a')}.rec-status`
  await dst.migrateIncoming(execUri(`load --postcopy --record ${img('a')}`, status), { capabilities: { 'postcopy-ram': true } })
  assert.is((await dst.waitMigration({ timeoutMs: 120_000 })).status, 'completed')
  assert.is(await waitStatus(status), 0)
  await dst.quit()
  const r = await snapctl(['load', img('c'), '--to', w.path('out2.stream')])
  assert.match(r.stderr, 'SNAP_BASE_CHANGED')
  const s = await snapctl(['create', img('d'), '--base', w.path('nope.snap'), '--from', out])
  assert.match(s.stderr, 'SNAP_BASE_MISSING')
})

/** A VM with a second QMP socket for snapctl save and restore (the harness holds the first). */
async function qmpVm(opts: VmOptions): Promise<{ vm: Vm; sock: string }> {
  const sock = w.path(`${opts.name}-snapctl.qmp`)
  return { vm: await w.vm({ ...opts, extraArgs: ['-qmp', `unix:${sock},server=on,wait=off`] }), sock }
}

test('save --base over QMP into another directory; restore and restore --lazy from the chain', async () => {
  mkdirSync(w.path('saves'))
  const one = w.path('saves/one.snap')
  const two = w.path('saves/two.snap')
  const saveTo = async (name: string, image: string, extra: string[]) => {
    const src = await qmpVm({ name, memMiB: 64, memPath: ram })
    const r = await snapctl(['save', image, '--qmp', src.sock, '-q', ...extra])
    assert.is(r.code, 0, r.stderr)
    await src.vm.quit()
  }
  await saveTo('save-one', one, [])
  change(ram, 0.05, 3)
  await saveTo('save-two', two, ['--base', one])
  const info = parseJson(await snapctl(['info', two, '--json']))
  assert.is(info.chain.base.path, 'one.snap', 'relative to the image where save put it')
  assert.ok(info.fileBytes < statSync(one).size / 10)
  for (const lazy of [false, true]) {
    const dst = await qmpVm({ name: `restore-${lazy}`, memMiB: 64, incoming: 'defer', keepMem: true })
    const r = await snapctl(['restore', two, '--qmp', dst.sock, '--paused', ...(lazy ? ['--lazy'] : [])])
    assert.is(r.code, 0, r.stderr)
    assert.equal(await filesEqual(ram, dst.vm.memPath), { equal: true }, `restore${lazy ? ' --lazy' : ''} from the chain differs`)
    await dst.vm.quit()
  }
})

test.run()
