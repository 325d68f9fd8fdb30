// The host's block cache for s3:// images (src/container/s3-cache.ts), on a real directory: one
// fetch however many ask at once, a claim left by a dead process taken over, the bound kept by
// evicting the least recently used blocks, short or foreign files never taken for a block.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { mkdtempSync, readdirSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { BlockCache } from '../../src/container/s3-cache.js'

const OBJ = '0123456789abcdef0123456789abcdef'
const dirs: string[] = []
function dir(): string {
  const d = mkdtempSync(join(tmpdir(), 'snapctl-s3cache-'))
  dirs.push(d)
  return d
}

async function cache(d: string, max = 1 << 30): Promise<BlockCache> {
  const c = new BlockCache(d, OBJ, '"etag-1"', max)
  await c.init()
  return c
}

test('several claimants of one block (separate caches on one directory, as processes): one fetch, all get its bytes', async () => {
  const d = dir()
  const caches = await Promise.all([0, 1, 2, 3].map(() => cache(d)))
  let fetches = 0
  const data = Buffer.alloc(4096, 7)
  const got = await Promise.all(caches.map((c) => c.obtain(5, 4096, async () => {
    fetches++
    await sleep(50)
    return Buffer.from(data)
  })))
  assert.is(fetches, 1)
  for (const g of got) assert.ok(g.buf.equals(data))
  assert.is(got.filter((g) => !g.hit).length, 1)
  // and the synchronous path finds it without a fetch
  const again = caches[0].obtainSync(5, 4096, () => {
    throw new Error('fetched again')
  })
  assert.ok(again.hit && again.buf.equals(data))
  assert.equal(readdirSync(join(d, 'blocks')).filter((n) => n.includes('.lock') || n.includes('.tmp-')), [])
})

test('a claim whose process is gone is taken over; a failed fetch lets go of its claim', async () => {
  const d = dir()
  const c = await cache(d)
  const blocks = join(d, 'blocks')
  await c.obtain(0, 10, async () => Buffer.alloc(10, 1)) // to learn the files' names
  const file = readdirSync(blocks)[0]
  // a claim by a pid that does not exist
  const lock = join(blocks, file.replace(/\.0$/, '.1.lock'))
  writeFileSync(lock, '2147483646\n')
  const r = await c.obtain(1, 10, async () => Buffer.alloc(10, 2))
  assert.is(r.hit, false)
  assert.ok(r.buf.equals(Buffer.alloc(10, 2)))
  const err = await c.obtain(2, 10, async () => {
    throw new Error('no network')
  }).catch((e: Error) => e.message)
  assert.is(err, 'no network')
  const r2 = await c.obtain(2, 10, async () => Buffer.alloc(10, 3))
  assert.ok(r2.buf.equals(Buffer.alloc(10, 3)))
})

test('the bound: the least recently used blocks go first; a block of the wrong length is a miss', async () => {
  const d = dir()
  const c = await cache(d, 4 * 1024)
  for (let i = 0; i < 8; i++) await c.obtain(i, 1024, async () => Buffer.alloc(1024, i))
  const blocks = join(d, 'blocks')
  // make block 0 the newest use, all others old
  const old = new Date(Date.now() - 60_000)
  for (const n of readdirSync(blocks)) utimesSync(join(blocks, n), old, old)
  await c.obtain(0, 1024, async () => Buffer.alloc(1024, 0))
  await c.evict()
  const left = readdirSync(blocks)
  const bytes = left.reduce((a, n) => a + statSync(join(blocks, n)).size, 0)
  assert.ok(bytes <= 4 * 1024, `${bytes} bytes left, bound 4096`)
  assert.ok(left.some((n) => n.endsWith('.0')), 'the most recently used block was evicted')
  const short = await c.obtain(0, 2048, async () => Buffer.alloc(2048, 9))
  assert.is(short.hit, false)
})

test('listed() names the blocks of this object only; readInto() reads a slice into place, false for a missing or short block', async () => {
  const d = dir()
  const c = await cache(d)
  for (const i of [0, 3, 7]) await c.obtain(i, 4096, async () => Buffer.alloc(4096, i + 1).fill(0xee, 100, 101))
  await new BlockCache(d, OBJ, '"etag-2"', 1 << 30).obtain(5, 4096, async () => Buffer.alloc(4096)) // another version of the object
  await new BlockCache(d, 'f'.repeat(32), '"etag-1"', 1 << 30).obtain(6, 4096, async () => Buffer.alloc(4096)) // another object
  writeFileSync(join(d, 'blocks', readdirSync(join(d, 'blocks')).find((n) => n.endsWith('.3'))!.replace(/\.3$/, '.9.lock')), '1\n')
  assert.equal([...(await c.listed())].sort(), [0, 3, 7])
  const into = Buffer.alloc(300, 0xaa)
  assert.is(await c.readInto(3, 50, into.subarray(10, 210), true), true)
  assert.ok(into.subarray(0, 10).equals(Buffer.alloc(10, 0xaa)) && into.subarray(210).equals(Buffer.alloc(90, 0xaa)), 'wrote outside its slice')
  const want = Buffer.alloc(200, 4)
  want[50] = 0xee
  assert.ok(into.subarray(10, 210).equals(want))
  assert.is(await c.readInto(4, 0, Buffer.alloc(10), false), false, 'a block not cached')
  assert.is(await c.readInto(7, 4000, Buffer.alloc(200), false), false, 'past the end of the block')
})

test.after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true })
})

test.run()
