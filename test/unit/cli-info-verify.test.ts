// `snapctl info` and `snapctl verify` end to end: output, exit statuses, JSON errors.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { spawnSync } from 'node:child_process'
import { readFileSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { SnapError } from '../../src/errors.js'
import { toSnapError } from '../../commands/_run-command.js'
import { makeImage, tempDir } from './container-helpers.js'

const bin = join(dirname(fileURLToPath(import.meta.url)), '../../../bin/run.js')
const t = tempDir('cli')
test.after(() => t.cleanup())
const run = (...args: string[]) => spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8' })

test('errors map to codes in one place', () => {
  assert.is(toSnapError(new SnapError('SNAP_CORRUPT', 'x')).code, 'SNAP_CORRUPT')
  assert.is(toSnapError(Object.assign(new Error('Nonexistent flag: --x'), { oclif: { exit: 2 } })).code, 'SNAP_USAGE')
  assert.is(toSnapError(new TypeError('boom')).exitCode, 1)
})

test('info and verify of a good, a damaged and a half-written image', async () => {
  const img = await makeImage(join(t.dir, 'vm.snap'), { ops: 200 })
  let r = run('info', img.path, '--json')
  assert.is(r.status, 0, r.stderr)
  const info = JSON.parse(r.stdout)
  assert.is(info.complete, true)
  assert.is(info.uuid, img.summary.uuid)
  assert.is(run('info', img.path).status, 0)
  r = run('verify', img.path)
  assert.is(r.status, 0, r.stderr)

  const bad = readFileSync(img.path)
  bad[8192 + 5] ^= 1
  writeFileSync(join(t.dir, 'bad.snap'), bad)
  r = run('verify', join(t.dir, 'bad.snap'))
  assert.is(r.status, 3)
  assert.match(r.stderr, 'snapctl: SNAP_CHECKSUM:')
  r = run('verify', join(t.dir, 'bad.snap'), '--json')
  assert.is(JSON.parse(r.stdout).problems[0].cluster, 0)

  writeFileSync(join(t.dir, 'partial.snap'), Buffer.alloc(8192))
  r = run('info', join(t.dir, 'partial.snap'), '--json')
  assert.is(JSON.parse(r.stdout).complete, false)
  r = run('verify', join(t.dir, 'missing.snap'), '--json')
  assert.is(r.status, 2)
  assert.is(JSON.parse(r.stdout).error.code, 'SNAP_NOT_FOUND')
  assert.is(run('verify', '--nope', img.path).status, 2)
})

test.run()
