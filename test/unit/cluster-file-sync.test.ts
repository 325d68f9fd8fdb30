// ClusterFile's periodic fdatasync (--sync without --bypass-cache): started every `syncEvery`
// bytes while clusters are written, so that the final one has little left; none with O_DIRECT
// (the data is on the disk when a write returns). The clusters read back as written either way.
import { test } from 'uvu'
import * as assert from 'uvu/assert'
import { randomBytes } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { CODEC_NONE } from '../../src/container/cluster.js'
import { ClusterFile, type ClusterFileOptions } from '../../src/container/cluster-file.js'

const dir = mkdtempSync(join(tmpdir(), 'snapctl-cluster-sync-'))
test.after(() => rmSync(dir, { recursive: true, force: true }))
const lim = { pageSize: 4096, maxPages: 64 }

async function write(name: string, opts: ClusterFileOptions): Promise<{ f: ClusterFile; raws: Buffer[] }> {
  const f = await ClusterFile.create(join(dir, name), lim, opts)
  const raws: Buffer[] = []
  for (let seq = 0; seq < 12; seq++) {
    const raw = randomBytes(lim.maxPages * lim.pageSize)
    const pages = new Uint32Array(2 * lim.maxPages).map((_, i) => (i % 2 ? seq * lim.maxPages + (i >> 1) : 0))
    f.enqueue(seq, pages, lim.maxPages, null, Promise.resolve({ codec: CODEC_NONE, stored: raw }))
    raws.push(raw)
    // Written, and a started fdatasync done, before the next: the count does not depend on timing.
    await f.flush()
  }
  await f.flush()
  return { f, raws }
}

test('syncEvery 1 MiB over 12 clusters of 260 KiB: an fdatasync every 4 clusters; none without it or with O_DIRECT', async () => {
  for (const [name, opts, expect] of [
    ['every', { syncEvery: 1 << 20 }, (n: number) => n === 3],
    ['never', {}, (n: number) => n === 0],
    ['direct', { syncEvery: 1 << 20, bypassCache: true }, (n: number) => n === 0],
  ] as const) {
    const { f, raws } = await write(name, opts)
    assert.ok(expect(f.syncs), `${name}: ${f.syncs} fdatasyncs`)
    for (let seq = 0; seq < raws.length; seq++) assert.ok(f.readSync(seq).stored.equals(raws[seq]), `${name}: cluster ${seq}`)
    await f.datasync()
    await f.close()
  }
})

test.run()
