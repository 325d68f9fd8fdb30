// Identical pages stored once (format-spec/container.md, "Shared slots") against real QEMU 10:
// guest RAM where the same page content recurs at many offsets is saved with exec:snapctl create
// (stored once per content), then restored eagerly and lazily (reads served while pages are
// missing), byte for byte; the same VM saved without --dedupe restores the same RAM.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { readFileSync, writeFileSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import { filesEqual, type Vm } from '../../tools/vm.js'
import { MiB, Workdir, execCreate, execLoad, execUri, fileRange, parseJson, snapctl, waitStatus } from './helpers.js'

const w = new Workdir('shared-slots')
test.after(() => w.cleanup())

const SIZE = 64 * MiB
const PAGE = 4096
const ram = w.path('src.ram')
const image = w.path('vm.snap')
let src: Vm
/** pages whose content is one of the repeated ones */
let repeated = 0

test.before(async () => {
  // Ten contents repeated over the RAM (some runs in order, as a copied buffer would be), random
  // pages between them, and zero runs.
  const kinds = Array.from({ length: 10 }, (_, i) => Buffer.concat([Buffer.from(`shared page ${i} `), randomBytes(PAGE)]).subarray(0, PAGE))
  const buf = Buffer.alloc(SIZE)
  for (let p = 0; p < SIZE / PAGE; p++) {
    const r = (p * 2654435761) >>> 0
    if (r % 10 < 4) {
      kinds[(p % 97) % kinds.length].copy(buf, p * PAGE)
      repeated++
    } else if (r % 10 < 7) randomBytes(PAGE).copy(buf, p * PAGE)
  }
  writeFileSync(ram, buf, { mode: 0o600 })
  src = await w.vm({ name: 'sh-src', memMiB: 64, memPath: ram })
})

test('saved with repeated pages stored once; restored eagerly, byte for byte', async () => {
  await execCreate(w, src, image, '--dedupe')
  const info = parseJson(await snapctl(['info', image, '--json']))
  // Nearly every repeated page but the first of each content points at a stored slot (the table
  // of fingerprints is lossy: another page in the same entry makes a content be stored again).
  assert.ok(info.sharedPages >= 0.99 * repeated && info.sharedPages < repeated, `${info.sharedPages} shared of ${repeated} repeated`)
  assert.ok(info.features.incompatible & 16, 'incompatible bit 4')
  assert.is(info.deadBytes, 0)
  const v = await snapctl(['verify', image, '--json'])
  assert.is(v.code, 0, v.stderr)
  const dst = await w.vm({ name: 'sh-eager', memMiB: 64, incoming: 'defer', keepMem: true })
  await execLoad(dst, image)
  assert.equal(await filesEqual(ram, dst.memPath), { equal: true }, 'eager restore')
  await dst.quit()
})

test('restored lazily: shared pages served on request and pushed, byte for byte', async () => {
  const dst = await w.vm({ name: 'sh-lazy', memMiB: 64, incoming: 'defer', keepMem: true })
  const status = `${image}.lazy-status`
  await dst.migrateIncoming(execUri(`load --postcopy ${image}`, status, `${image}.lazy-stderr`), { capabilities: { 'postcopy-ram': true } })
  const active = await dst.waitMigration({ until: ['postcopy-active', 'completed', 'failed'], timeoutMs: 60_000 })
  assert.ok(active.status === 'postcopy-active' || active.status === 'completed', JSON.stringify(active))
  // Reads of repeated pages while pages are missing: each faults its page in through the return path.
  for (let i = 0; i < 12; i++) {
    const addr = (1 + i * 613) * PAGE
    assert.equal(await dst.readGuest(addr, 64), fileRange(ram, addr, 64), `guest read at 0x${addr.toString(16)}`)
  }
  const done = await dst.waitMigration({ timeoutMs: 120_000 })
  assert.is(done.status, 'completed', JSON.stringify(done))
  assert.is(await waitStatus(status), 0, readFileSync(`${image}.lazy-stderr`, 'utf8'))
  assert.equal(await filesEqual(ram, dst.memPath), { equal: true }, 'lazy restore')
  await dst.quit()
})

test('without --dedupe: every page stored, the same RAM restored; the shared image is smaller', async () => {
  await src.quit()
  src = await w.vm({ name: 'sh-src2', memMiB: 64, memPath: ram })
  const plain = w.path('plain.snap')
  await execCreate(w, src, plain)
  const info = parseJson(await snapctl(['info', plain, '--json']))
  assert.is(info.sharedPages, 0)
  assert.is(info.features.incompatible & 16, 0)
  const shared = parseJson(await snapctl(['info', image, '--json']))
  assert.ok(shared.fileBytes < info.fileBytes, `${shared.fileBytes} < ${info.fileBytes}`)
  const dst = await w.vm({ name: 'sh-plain', memMiB: 64, incoming: 'defer', keepMem: true })
  await execLoad(dst, plain)
  assert.equal(await filesEqual(ram, dst.memPath), { equal: true })
  await dst.quit()
  await src.quit()
})

test.run()
