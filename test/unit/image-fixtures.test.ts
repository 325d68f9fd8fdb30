// Images written by every released format version stay readable: each is committed under
// test/fixtures/ with the script that made it (tools/make-image-fixtures.sh), and opened here
// with info, verify and load. The restored stream's hash is fixed: a format or reader change
// that reads an old image differently fails here.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { copyFileSync, readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { tempDir } from './container-helpers.js'

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..')
const bin = join(root, 'bin/run.js')
const run = (...args: string[]) => spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8' })
const t = tempDir('fixtures')
test.after(() => t.cleanup())

const FIXTURES = [
  {
    // format v1, from test/fixtures/qemu10-pc-16M.stream with --cluster-size 64K
    file: 'v1-pc-16M.snap',
    version: 1,
    machine: 'pc-i440fx-10.0',
    pages: 4226,
    zeroPages: 4175,
    clusters: 4,
    incompatible: 0,
    loadSha256: '6332da07996f87a4a90d74b87be149839540e3c95be414f5c63483e8bf810316',
  },
  {
    // the same stream with framed clusters (incompatible bit 3), 256K clusters
    file: 'v1-framed-pc-16M.snap',
    version: 1,
    machine: 'pc-i440fx-10.0',
    pages: 4226,
    zeroPages: 4175,
    clusters: 1,
    incompatible: 8,
    loadSha256: '6332da07996f87a4a90d74b87be149839540e3c95be414f5c63483e8bf810316',
  },
  {
    // shared slots (incompatible bit 4): a stream of its own, 1 MiB of one text line repeated
    // (15 page contents), 256K clusters; 241 of its 307 data pages share a slot
    file: 'v1-shared-pc-16M.snap',
    version: 1,
    machine: 'pc-i440fx-10.0',
    pages: 4226,
    zeroPages: 3919,
    sharedPages: 241,
    clusters: 2,
    incompatible: 24,
    loadSha256: '157d609f0a1dab8a6335c684c7eb20b0a0ad5483416665b8cc2c7823938a98ad',
  },
]

for (const f of FIXTURES) {
  test(`${f.file} (format v${f.version}): info, verify and load`, () => {
    // A copy: load builds the page index beside the image, and the fixture stays as committed.
    const img = join(t.dir, f.file)
    copyFileSync(join(root, 'test/fixtures', f.file), img)

    let r = run('info', img, '--json')
    assert.is(r.status, 0, r.stderr)
    const info = JSON.parse(r.stdout)
    assert.is(info.complete, true)
    assert.is(info.version, f.version)
    assert.is(info.machine, f.machine)
    assert.is(info.pages, f.pages)
    assert.is(info.zeroPages, f.zeroPages)
    assert.is(info.features.incompatible, f.incompatible)
    assert.is(info.framedClusters, f.incompatible ? f.clusters : 0)
    assert.is(info.sharedPages ?? 0, f.sharedPages ?? 0)

    r = run('verify', img, '--json')
    assert.is(r.status, 0, r.stderr)
    assert.is(JSON.parse(r.stdout).clusters, f.clusters)

    const out = join(t.dir, `${f.file}.stream`)
    r = run('load', img, '--to', out)
    assert.is(r.status, 0, r.stderr)
    assert.is(createHash('sha256').update(readFileSync(out)).digest('hex'), f.loadSha256)
  })
}

test.run()
