// Direct I/O for --bypass-cache (src/container/direct-io.ts) on the real filesystem of the
// temporary directory: aligned buffers found by probing, writes split over slots and padded
// with zeroes, and LocalFile reads of any range (aligned or not) equal to buffered reads.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { randomBytes } from 'node:crypto'
import { constants, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { LocalFile } from '../../src/container/byte-source.js'
import { AlignedPool, DIRECT_ALIGN, openDirect, probeRead, probeWriteZeros, writeDirect } from '../../src/container/direct-io.js'

const dir = mkdtempSync(join(tmpdir(), 'snapctl-direct-io-'))
test.after(() => rmSync(dir, { recursive: true, force: true }))

test('writeDirect: parts across several slots, the end padded with zeroes to 4096', async () => {
  const path = join(dir, 'w')
  writeFileSync(path, '')
  const fh = await openDirect(path, constants.O_WRONLY)
  assert.ok(fh, `${dir} refuses O_DIRECT: run the unit suites with TMPDIR on a disk`)
  try {
    const pool = new AlignedPool(2 * DIRECT_ALIGN, 2, probeWriteZeros(fh.fd))
    const parts = [randomBytes(5000), randomBytes(1), randomBytes(9000)]
    await writeDirect(fh, pool, parts, DIRECT_ALIGN)
    const got = readFileSync(path)
    assert.is(got.length, DIRECT_ALIGN + 4 * DIRECT_ALIGN)
    assert.ok(got.subarray(0, DIRECT_ALIGN).equals(Buffer.alloc(DIRECT_ALIGN)), 'the probe wrote zeroes at 0')
    const all = Buffer.concat(parts)
    assert.ok(got.subarray(DIRECT_ALIGN, DIRECT_ALIGN + all.length).equals(all))
    assert.ok(got.subarray(DIRECT_ALIGN + all.length).equals(Buffer.alloc(got.length - DIRECT_ALIGN - all.length)))
  } finally {
    await fh.close()
  }
})

test('AlignedPool: its buffers are aligned, a slice 4096 bytes on is, one 16 bytes on is not; a misaligned O_DIRECT read fails', async () => {
  const path = join(dir, 'r')
  writeFileSync(path, randomBytes(4 * DIRECT_ALIGN))
  const fh = await openDirect(path, constants.O_RDONLY)
  assert.ok(fh)
  try {
    const pool = new AlignedPool(2 * DIRECT_ALIGN, 1, probeRead(fh.fd))
    const b = pool.takeSync(2 * DIRECT_ALIGN)
    assert.ok(pool.aligned(b) && pool.aligned(b.subarray(DIRECT_ALIGN)))
    assert.not.ok(pool.aligned(b.subarray(16)))
    assert.not.ok(pool.aligned(Buffer.alloc(DIRECT_ALIGN)))
    const { bytesRead } = await fh.read(b, 0, DIRECT_ALIGN, DIRECT_ALIGN)
    assert.is(bytesRead, DIRECT_ALIGN)
    assert.ok(b.subarray(0, DIRECT_ALIGN).equals(readFileSync(path).subarray(DIRECT_ALIGN, 2 * DIRECT_ALIGN)))
    // What the probe relies on: the kernel checks the address. Some offset in 16..4080 is refused.
    let refused = 0
    for (let k = 16; k < DIRECT_ALIGN; k += 16) {
      try {
        await fh.read(b, k, DIRECT_ALIGN, 0)
      } catch (e) {
        assert.is((e as NodeJS.ErrnoException).code, 'EINVAL')
        refused++
      }
    }
    assert.ok(refused > 0, 'no misaligned address was refused: the probe would find nothing')
  } finally {
    await fh.close()
  }
})

test('LocalFile with bypassCache: every range, aligned or not, async and sync, as a buffered read', async () => {
  const path = join(dir, 'img')
  const data = randomBytes(64 * 1024)
  writeFileSync(path, data)
  const direct = await LocalFile.open(path, { bypassCache: true })
  assert.is(direct.note, null)
  const into = direct.buffer(16 * 1024)
  const ranges: Array<[number, number]> = [[0, 4096], [4096, 12288], [100, 5], [4095, 2], [8192, 5000], [65536 - 64, 64], [0, 65536], [12345, 40000]]
  for (const [pos, len] of ranges) {
    const want = data.subarray(pos, pos + len)
    assert.ok((await direct.read(pos, len)).equals(want), `read ${pos} ${len}`)
    assert.ok(direct.readSync(pos, len).equals(want), `readSync ${pos} ${len}`)
    if (len <= into.length) assert.ok((await direct.read(pos, len, into)).equals(want), `read into ${pos} ${len}`)
  }
  const err = await direct.read(65536 - 100, 200).then(() => null, (e: { code: string }) => e)
  assert.is(err?.code, 'SNAP_TRUNCATED')
  assert.throws(() => direct.readSync(65536, 1), (e: { code: string }) => e.code === 'SNAP_TRUNCATED')
  await direct.close()
})

test.run()
