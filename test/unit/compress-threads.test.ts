// create --threads (issue 13: compression on more than one thread): native/lz4's
// encodeFramesAsync stores exactly what encodeFrames stores, on a libuv pool thread, and an
// image written with threads > 1 is the image written with one, byte for byte but for its uuid
// and creation time.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { randomBytes } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { encodeFrames, encodeFramesAsync } from '../../src/container/cluster.js'
import { nativeLz4 } from '../../src/container/lz4-block.js'
import { openImage } from '../../src/container/chain.js'
import { HEADER_SIZE } from '../../src/container/header.js'
import { FOOTER_SIZE } from '../../src/container/footer.js'
import { checkPages, makeImage, tempDir } from './container-helpers.js'

const PS = 4096

/** Pages of every kind: random (incompressible), zero, text, a pattern; `n` of them. */
function pages(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n * PS)
  for (let i = 0; i < n; i++) {
    const p = b.subarray(i * PS, (i + 1) * PS)
    const kind = (i * 7 + seed) % 4
    if (kind === 0) randomBytes(PS).copy(p)
    else if (kind === 1) p.write(`page ${i} of seed ${seed}: the quick brown fox `.repeat(100).slice(0, PS))
    else if (kind === 2) for (let j = 0; j < PS; j++) p[j] = (j % (3 + seed)) * 17
  }
  return b
}

test('the addon is built: these tests run its pool path, not the fallback', () => {
  assert.type(nativeLz4()?.encodeFramesAsync, 'function', 'native/lz4 without encodeFramesAsync: run npm run build')
})

test('encodeFramesAsync: the same stored bytes and frame table as encodeFrames', async () => {
  const cases: Array<[Buffer, number]> = [
    [pages(256, 1), 32], [pages(256, 2), 32], [pages(255, 3), 32], [pages(1, 4), 32], [pages(33, 5), 32],
    [pages(64, 6), 1], [pages(64, 7), 7], [pages(16, 8), 16], [randomBytes(256 * PS), 32], [Buffer.alloc(256 * PS), 32],
  ]
  for (const [raw, fp] of cases) {
    const a = encodeFrames(raw, PS, fp, Buffer.alloc(raw.length, 0xaa))
    const b = await encodeFramesAsync(raw, PS, fp, Buffer.alloc(raw.length, 0x55))
    if (a === null) {
      assert.is(b, null, `${raw.length / PS} pages in frames of ${fp}: both store raw`)
      continue
    }
    assert.ok(b !== null, `${raw.length / PS} pages in frames of ${fp}`)
    assert.ok(a.stored.equals(b.stored), `${raw.length / PS} pages in frames of ${fp}: stored bytes`)
    assert.equal([...a.frames], [...b.frames], `${raw.length / PS} pages in frames of ${fp}: frame table`)
  }
})

test('encodeFramesAsync: many at once, each into its own buffer, each right', async () => {
  const raws = Array.from({ length: 48 }, (_, i) => pages(256, i))
  const outs = await Promise.all(raws.map((r) => encodeFramesAsync(r, PS, 32, Buffer.alloc(r.length))))
  raws.forEach((r, i) => {
    const want = encodeFrames(r, PS, 32, Buffer.alloc(r.length))!
    assert.ok(outs[i]!.stored.equals(want.stored), `cluster ${i}`)
    assert.equal([...outs[i]!.frames], [...want.frames])
  })
})

test('native encodeFramesAsync refuses bad arguments at once: wrong types, a short dst or frame table, a bad frame size', () => {
  const lib = nativeLz4()!
  const src = pages(8, 1)
  const ok = (): Buffer => Buffer.alloc(src.length)
  const throwsType = (fn: () => unknown, what: string) => assert.throws(fn, (e: unknown) => e instanceof TypeError, what)
  const throwsRange = (fn: () => unknown, what: string) => assert.throws(fn, (e: unknown) => e instanceof RangeError, what)
  throwsType(() => lib.encodeFramesAsync('x' as unknown as Uint8Array, ok(), 4 * PS, new Uint32Array(4)), 'src a string')
  throwsType(() => lib.encodeFramesAsync(src, new Uint16Array(src.length) as unknown as Uint8Array, 4 * PS, new Uint32Array(4)), 'dst not bytes')
  throwsType(() => lib.encodeFramesAsync(src, ok(), 4 * PS, new Uint8Array(16) as unknown as Uint32Array), 'frames not a Uint32Array')
  throwsType(() => (lib.encodeFramesAsync as unknown as (a: unknown) => unknown)(src), 'too few arguments')
  throwsRange(() => lib.encodeFramesAsync(src, Buffer.alloc(src.length - 1), 4 * PS, new Uint32Array(4)), 'dst too short')
  throwsRange(() => lib.encodeFramesAsync(src, ok(), 4 * PS, new Uint32Array(3)), 'frame table too short')
  throwsRange(() => lib.encodeFramesAsync(src, ok(), 0, new Uint32Array(4)), 'frameBytes 0')
  throwsRange(() => lib.encodeFramesAsync(src, ok(), -5, new Uint32Array(4)), 'frameBytes < 0')
})

test('an image written with threads 3 or 6 is the one written with 1 but for its uuid and time, and reads back its pages', async () => {
  const t = tempDir('threads')
  try {
    const opts = { ops: 3000, seed: 7, resend: 0.3 }
    const one = await makeImage(join(t.dir, 'one.snap'), { ...opts, threads: 1 })
    assert.ok(one.summary.clusters > 8, `${one.summary.clusters} clusters`)
    const a = readFileSync(one.path)
    for (const threads of [3, 6]) {
      const more = await makeImage(join(t.dir, `threads-${threads}.snap`), { ...opts, threads })
      const b = readFileSync(more.path)
      assert.is(a.length, b.length)
      assert.ok(a.subarray(HEADER_SIZE, a.length - FOOTER_SIZE).equals(b.subarray(HEADER_SIZE, b.length - FOOTER_SIZE)), `threads ${threads}: clusters and trailer byte for byte`)
      const img = await openImage(more.path)
      try {
        checkPages(img, more.model, `threads ${threads}`)
      } finally {
        await img.close()
      }
    }
  } finally {
    t.cleanup()
  }
})

test('threads must be a whole number from 1', async () => {
  const t = tempDir('threads-bad')
  try {
    for (const n of [0, 1.5, -1]) {
      let code = 'none'
      await makeImage(join(t.dir, `bad-${n}.snap`), { threads: n }).catch((e) => (code = e.code))
      assert.is(code, 'SNAP_USAGE', `threads ${n}`)
    }
  } finally {
    t.cleanup()
  }
})

test.run()
