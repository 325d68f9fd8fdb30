// A damaged page index, through the real commands: deleted, copied from another image with the
// same block layout (also with its stamp forged to match), its LevelDB files overwritten or cut
// short. verify must report it (SNAP_INDEX_MISMATCH, the image itself intact) or find it
// harmless (and write nothing); load must write exactly the stream the intact image gives and
// rebuild the index, and a real QEMU restores from an image whose index was damaged, byte for byte.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { cpSync, existsSync, readFileSync, readdirSync, rmSync, statSync, truncateSync, writeFileSync, openSync, writeSync, closeSync } from 'node:fs'
import { join } from 'node:path'
import { Level } from 'level'
import { fillRam, filesEqual } from '../../tools/vm.js'
import { META_KEY } from '../../src/index/keys.js'
import { MiB, Workdir, execLoad, parseJson, snapctl } from './helpers.js'

const w = new Workdir('index')
test.after(() => w.cleanup())
const ramA = w.path('a.ram')
const imageA = w.path('a.snap')
const imageB = w.path('b.snap')
const pristine = w.path('a.index.pristine')
let want: Buffer

test.before(async () => {
  // Two VMs of one layout with different RAM: b's index would send a's pages to wrong places.
  const mixes = [{ random: 40, text: 20, pattern: 15, zero: 25 }, { random: 10, text: 10, pattern: 10, zero: 70 }]
  for (const [i, name] of ['a', 'b'].entries()) {
    const ram = w.path(`${name}.ram`)
    await fillRam(ram, 64 * MiB, { seed: 20 + i, mix: mixes[i] })
    const vm = await w.vm({ name: `idx-${name}`, memMiB: 64, memPath: ram })
    await vm.migrate(`file:${w.path(`${name}.stream`)}`)
    assert.is((await vm.waitMigration()).status, 'completed')
    await vm.quit()
    const r = await snapctl(['create', w.path(`${name}.snap`), '--from', w.path(`${name}.stream`), '--cluster-size', '64K'])
    assert.is(r.code, 0, r.stderr)
  }
  assert.is((await snapctl(['load', imageA, '--to', w.path('want.stream')])).code, 0)
  want = readFileSync(w.path('want.stream'))
  cpSync(`${imageA}.index`, pristine, { recursive: true })
})

function resetIndex(): void {
  rmSync(`${imageA}.index`, { recursive: true, force: true })
  cpSync(pristine, `${imageA}.index`, { recursive: true })
}

/** verify finds the damage (index only) or none; load writes the right stream and repairs the index. */
async function detectedAndRepaired(label: string, mustDetect: boolean): Promise<void> {
  const v = await snapctl(['verify', imageA, '--json'])
  const report = parseJson(v)
  if (v.code !== 0 || mustDetect) {
    assert.is(v.code, 7, `${label}: verify exit ${v.code}: ${JSON.stringify(report.problems ?? report)}`)
    assert.is(report.imageOk, true, label)
    assert.equal([...new Set(report.problems.map((p: { code: string }) => p.code))], ['SNAP_INDEX_MISMATCH'], label)
  }
  const out = w.path(`${label}.stream`)
  const l = await snapctl(['load', imageA, '--to', out])
  assert.is(l.code, 0, `${label}: ${l.stderr}`)
  assert.ok(readFileSync(out).equals(want), `${label}: load wrote another stream`)
  rmSync(out)
  const again = await snapctl(['verify', imageA, '--json'])
  assert.is(again.code, 0, `${label}: after load: ${again.stdout}`)
  assert.is(parseJson(again).index, 'ok', label)
}

test('the index deleted: verify says so and writes nothing, load restores the same stream and rebuilds it', async () => {
  rmSync(`${imageA}.index`, { recursive: true })
  const v = await snapctl(['verify', imageA, '--json'])
  assert.is(v.code, 0, v.stderr)
  assert.is(parseJson(v).index, 'missing')
  assert.not.ok(existsSync(`${imageA}.index`), 'verify wrote an index')
  await detectedAndRepaired('deleted', false)
})

test("another image's index (same block layout): refused by its stamp, rebuilt", async () => {
  rmSync(`${imageA}.index`, { recursive: true })
  cpSync(`${imageB}.index`, `${imageA}.index`, { recursive: true })
  await detectedAndRepaired('other-image', true)
})

test("another image's index with the stamp forged to match: its entries are still not used", async () => {
  const own = new Level<Buffer, Buffer>(pristine, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  const meta = await own.get(META_KEY)
  await own.close()
  rmSync(`${imageA}.index`, { recursive: true })
  cpSync(`${imageB}.index`, `${imageA}.index`, { recursive: true })
  const forged = new Level<Buffer, Buffer>(`${imageA}.index`, { keyEncoding: 'buffer', valueEncoding: 'buffer' })
  await forged.put(META_KEY, meta!)
  await forged.close()
  await detectedAndRepaired('forged', true)
})

function dataFiles(): string[] {
  const dir = `${imageA}.index`
  return readdirSync(dir).filter((f) => /\.(ldb|log)$/.test(f) && statSync(join(dir, f)).size > 0).map((f) => join(dir, f))
}

test('LevelDB files overwritten in the middle, or cut to half: detected or harmless, never used wrongly', async () => {
  for (const how of ['overwrite', 'truncate'] as const) {
    resetIndex()
    const files = dataFiles()
    assert.ok(files.length > 0, 'no LevelDB data files to damage')
    for (const f of files) {
      const size = statSync(f).size
      if (how === 'truncate') truncateSync(f, Math.floor(size / 2))
      else {
        const fd = openSync(f, 'r+')
        writeSync(fd, Buffer.alloc(Math.min(64, size), 0xa5), 0, Math.min(64, size), Math.floor(size / 3))
        closeSync(fd)
      }
    }
    await detectedAndRepaired(how, false)
  }
})

test('CURRENT and MANIFEST damaged: the index is unreadable, reported, rebuilt', async () => {
  resetIndex()
  const dir = `${imageA}.index`
  for (const f of readdirSync(dir).filter((n) => n.startsWith('MANIFEST-'))) writeFileSync(join(dir, f), 'garbage')
  await detectedAndRepaired('manifest', true)
  resetIndex()
  rmSync(join(dir, 'CURRENT'))
  await detectedAndRepaired('current', true)
})

test('a real QEMU restores byte for byte from an image whose index came from another image', async () => {
  rmSync(`${imageA}.index`, { recursive: true })
  cpSync(`${imageB}.index`, `${imageA}.index`, { recursive: true })
  const dst = await w.vm({ name: 'idx-dst', memMiB: 64, incoming: 'defer', keepMem: true })
  await execLoad(dst, imageA)
  assert.equal(await filesEqual(ramA, dst.memPath), { equal: true })
  await dst.quit()
})

test.run()
