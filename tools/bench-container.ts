// Benchmark of the container: writes a synthetic image (random, text-like, patterned and zero
// pages), verifies it, rebuilds its index, and prints JSON and a short table.
//   node dist/tools/bench-container.js [SIZE_MIB=1024] [--dir DIR] [--cluster-size BYTES] [--compress lz4|none] [--keep]
import { randomFillSync } from 'node:crypto'
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { ImageReader } from '../src/container/reader.js'
import { ImageWriter } from '../src/container/writer.js'
import { clusterHeaderBlock } from '../src/container/cluster.js'
import { PageIndex } from '../src/index/page-index.js'
import { verifyImage } from '../src/verify.js'

const PS = 4096
const argv = process.argv.slice(2)
const opt = (name: string) => {
  const i = argv.indexOf(name)
  return i >= 0 ? argv.splice(i, 2)[1] : undefined
}
const keep = argv.includes('--keep')
const dir = opt('--dir') ?? mkdtempSync(join(tmpdir(), 'snapctl-bench-'))
mkdirSync(dir, { recursive: true })
const clusterSize = Number(opt('--cluster-size') ?? 1048576)
const compress = (opt('--compress') ?? 'lz4') as 'lz4' | 'none'
const sizeMiB = Number(argv.find((a) => !a.startsWith('--')) ?? 1024)
const pages = (sizeMiB * 1048576) / PS

// Page sources, made once so that generating pages costs nothing during the timed write.
const random = randomFillSync(Buffer.allocUnsafe(64 << 20))
const words = ['the', 'kernel', 'page', 'cache', 'memory', 'process', 'return', 'static', 'int', 'void', '{', '}', ';', 'struct', 'data', 'error']
const text = Buffer.allocUnsafe(16 << 20)
for (let i = 0, s = 12345; i < text.length; ) {
  s = (s * 1103515245 + 12345) >>> 0
  const w = words[s % words.length]
  i += text.write(`${w}${s % 7 === 0 ? '\n' : ' '}`, i)
}
const patterns = Array.from({ length: 64 }, (_, i) => {
  const p = Buffer.alloc(PS)
  for (let j = 0; j < PS; j += 8) p.writeUInt32LE(i * 0x01010101 + (j % 64), j)
  return p
})

async function main(): Promise<void> {
  const path = join(dir, 'bench.snap')
  const t0 = performance.now()
  const w = await ImageWriter.create(path, { clusterSize, compress, force: true })
  w.setBlocks([{ name: 'pc.ram', size: pages * PS }])
  let seed = 1
  for (let p = 0; p < pages; p++) {
    seed = (seed * 1664525 + 1013904223) >>> 0
    const kind = seed % 20 // 40% random, 25% text, 20% pattern, 15% zero
    if (kind < 8) {
      const off = (seed >>> 8) % (random.length / PS - 1)
      w.putPage(0, p, random.subarray(off * PS, off * PS + PS))
    } else if (kind < 13) {
      const off = ((seed >>> 8) % (text.length - PS)) & ~7
      w.putPage(0, p, text.subarray(off, off + PS))
    } else if (kind < 17) w.putPage(0, p, patterns[(seed >>> 8) % patterns.length])
    else w.putZero(0, p)
    if (w.needsDrain()) await w.drain()
  }
  const device = { machine: 'pc-q35-10.0', config: Buffer.from([7, 0, 0, 0, 0]), ramSectionId: 2, ramInstanceId: 0, ramVersion: 4, switchoverStart: false, ramEnd: true, deviceSections: Buffer.alloc(200000, 1), streamEnd: Buffer.from([0]) }
  const s = await w.finish(device, { source: 'qemu', counters: { pages, zeroPages: 0, xbzrlePages: 0, resentPages: 0, bytesIn: 0, sections: 0 } })
  const writeSec = (performance.now() - t0) / 1000

  const reader = await ImageReader.open(path)
  const infos = await reader.clusterInfos()
  const headerBlocks = infos.reduce((n, c) => n + clusterHeaderBlock(c.pageCount, c.frames), 0)
  const payloadPadding = infos.reduce((n, c) => n + (Math.ceil(c.storedLength / 4096) * 4096 - c.storedLength), 0)
  const tailBytes = s.fileBytes - reader.header.trailerOffset
  const t1 = performance.now()
  await PageIndex.build(reader)
  const indexSec = (performance.now() - t1) / 1000
  await reader.close()

  const t2 = performance.now()
  const v = await verifyImage(path)
  const verifySec = (performance.now() - t2) / 1000
  const overhead = 4096 + headerBlocks + payloadPadding + tailBytes - device.deviceSections.length - device.config.length - 1
  const result = {
    ramBytes: pages * PS, clusterSize, compress, clusters: s.clusters, fileBytes: s.fileBytes, storedBytes: s.storedBytes,
    writeSeconds: writeSec, writeMBps: (pages * PS) / 1e6 / writeSec,
    verifySeconds: verifySec, verifyMBps: s.fileBytes / 1e6 / verifySec, verifyOk: v.ok,
    overheadBytes: overhead, overheadPct: (100 * overhead) / s.storedBytes,
    overheadParts: { header: 4096, clusterHeaders: headerBlocks, payloadPadding, trailerAndFooter: tailBytes },
    indexBuildSeconds: indexSec, indexUsPerPage: (indexSec * 1e6) / s.pages, indexRuns: reader.runs.length,
    sizeVsRawPct: (100 * s.fileBytes) / (pages * PS),
  }
  process.stdout.write(`${JSON.stringify(result, null, 2)}\n`)
  const rows: Array<[string, string]> = [
    ['RAM', `${sizeMiB} MiB, ${pages} pages, ${s.clusters} clusters of ${clusterSize / 1024} KiB`],
    ['write', `${result.writeMBps.toFixed(0)} MB/s (${writeSec.toFixed(2)} s, through the page cache, index included; no fdatasync (create --sync adds it))`],
    ['verify', `${result.verifyMBps.toFixed(0)} MB/s (${verifySec.toFixed(2)} s, warm page cache)`],
    ['overhead', `${result.overheadPct.toFixed(3)}% of stored data (${overhead} bytes)`],
    ['index build', `${(indexSec * 1000).toFixed(0)} ms, ${result.indexUsPerPage.toFixed(2)} µs/page, ${reader.runs.length} runs`],
    ['image size', `${result.sizeVsRawPct.toFixed(1)}% of RAM`],
  ]
  for (const [k, val] of rows) process.stdout.write(`${k.padEnd(12)} ${val}\n`)
  if (!keep) rmSync(dir, { recursive: true, force: true })
}

await main()
