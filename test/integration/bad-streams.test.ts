// Bad input through the real command: truncated, corrupted and random streams, and a source
// QEMU killed in the middle of `migrate exec:snapctl create`. Each must fail with a stream
// error code and leave no image behind (nothing at the path, nothing that verifies).
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { fillRam } from '../../tools/vm.js'
import { MiB, Workdir, execUri, snapctl, waitStatus } from './helpers.js'

const w = new Workdir('bad')
test.after(() => w.cleanup())
const fixture = join(dirname(fileURLToPath(import.meta.url)), '../../../test/fixtures/qemu10-pc-16M.stream')

function leftovers(image: string): string[] {
  const dir = dirname(image)
  return readdirSync(dir).filter((f) => f.includes('bad.snap'))
}

async function expectRefused(input: Buffer, label: string): Promise<void> {
  const file = w.path('input.bin')
  writeFileSync(file, input)
  const image = w.path('bad.snap')
  const r = await snapctl(['create', image, '--from', file])
  assert.is(r.code, 4, `${label}: exit ${r.code}: ${r.stderr}`)
  assert.match(r.stderr, /snapctl: SNAP_STREAM_[A-Z_]+: /, label)
  assert.equal(leftovers(image), [], `${label}: left files behind`)
}

test('the real fixture stream is accepted (so the refusals below are about the damage)', async () => {
  const image = w.path('good.snap')
  const r = await snapctl(['create', image, '--from', fixture])
  assert.is(r.code, 0, r.stderr)
  assert.is((await snapctl(['verify', image])).code, 0)
})

test('truncated at 40 offsets: refused, nothing left', async () => {
  const full = readFileSync(fixture)
  const cuts = new Set<number>([0, 1, 4, 8, 9, 20, full.length - 1, full.length - 2, full.length - 100])
  for (let i = 0; cuts.size < 40; i++) cuts.add(Math.floor(((i * 7919) % 1000) / 1000 * full.length))
  for (const cut of cuts) await expectRefused(full.subarray(0, cut), `cut at ${cut}`)
})

test('random bytes and a corrupted header: refused', async () => {
  await expectRefused(randomBytes(100_000), 'random')
  const full = Buffer.from(readFileSync(fixture))
  full[3] ^= 0xff
  await expectRefused(full, 'bad magic')
})

test('source QEMU killed mid-migration: create fails, no image', async () => {
  const ram = w.path('kill.ram')
  await fillRam(ram, 128 * MiB, { seed: 3, mix: { random: 100, text: 0, pattern: 0, zero: 0 } })
  const vm = await w.vm({ name: 'kill-src', memMiB: 128, memPath: ram })
  const image = w.path('killed.snap')
  const status = `${image}.status`
  await vm.migrate(execUri(`create ${image}`, status, `${image}.stderr`), { parameters: { 'max-bandwidth': 16 * MiB } })
  await vm.waitMigration({ done: (i) => i.ram?.transferred > 8 * MiB, timeoutMs: 60_000 })
  vm.kill('SIGKILL')
  const code = await waitStatus(status)
  assert.is(code, 4, readFileSync(`${image}.stderr`, 'utf8'))
  assert.match(readFileSync(`${image}.stderr`, 'utf8'), /SNAP_STREAM_TRUNCATED/)
  assert.not.ok(existsSync(image))
  assert.equal(readdirSync(w.dir).filter((f) => f.includes('killed.snap') && f.includes('partial')), [])
})

test.run()
