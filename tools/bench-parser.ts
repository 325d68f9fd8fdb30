// Benchmark of the stream parser (the save hot path): a synthetic stream of SIZE_MIB of guest
// RAM (3 data pages in 4, the rest zero; a block name every 64 records, CONTINUE otherwise), fed
// in 64 KiB pieces (what a pipe gives). Only push() is timed: the stream is built in 64 MiB
// sections outside the clock, so the figure is the parser's alone.
//   node dist/tools/bench-parser.js [SIZE_MIB=1024] [--runs N]
import { StreamParser } from '../src/stream/parser.js'
import { PageRecordWriter, eosFooter, fileHeader, ramStartSection, sectionEndHeader, sectionPartHeader } from '../src/stream/encoder.js'
import type { RamBlockDecl, RamSink } from '../src/types.js'

const PS = 4096
const argv = process.argv.slice(2)
const runsAt = argv.indexOf('--runs')
const runs = runsAt >= 0 ? Number(argv.splice(runsAt, 2)[1]) : 3
const sizeMiB = Number(argv[0] ?? 1024)
const SECTION_PAGES = 16384 // 64 MiB
const blocks: RamBlockDecl[] = [
  { name: 'pc.ram', size: sizeMiB * 1048576 },
  { name: 'pc.bios', size: 65536 },
]
const config = Buffer.concat([Buffer.from([0x07, 0, 0, 0, 14]), Buffer.from('pc-i440fx-10.0', 'latin1')])
const data = Buffer.alloc(PS, 0xa5)

class NullSink implements RamSink {
  n = 0
  blocks(): void {}
  zero(): void { this.n++ }
  page(_b: number, _p: number, d: Uint8Array): void { this.n += d[0] }
  xbzrle(): void {}
}

function section(first: number, last: boolean): Buffer {
  const w = new PageRecordWriter(blocks, { chunkSize: 80 << 20 })
  w.raw(last ? sectionEndHeader(1) : sectionPartHeader(1))
  for (let p = first; p < first + SECTION_PAGES && p * PS < blocks[0].size; p++) {
    if (p % 64 === 0) w.forgetBlock()
    if (p % 4 === 3) w.zero(0, p)
    else w.page(0, p, data)
  }
  w.raw(eosFooter(1))
  if (last) w.raw(Buffer.from([0]))
  return Buffer.concat(w.flush())
}

function once(): number {
  const sink = new NullSink()
  const parser = new StreamParser(sink)
  const feed = (b: Buffer): bigint => {
    const t0 = process.hrtime.bigint()
    for (let i = 0; i < b.length; i += 65536) parser.push(b.subarray(i, i + 65536))
    return process.hrtime.bigint() - t0
  }
  let ns = feed(Buffer.concat([fileHeader(config), ramStartSection({ sectionId: 1, instanceId: 0, version: 4 }, blocks)]))
  const total = blocks[0].size / PS
  for (let p = 0; p < total; p += SECTION_PAGES) ns += feed(section(p, p + SECTION_PAGES >= total))
  try {
    parser.end()
  } catch {
    // the bench's tail is a bare EOF; only the RAM is measured
  }
  return Number(ns) / 1e9
}

const results: number[] = []
for (let r = 0; r < runs; r++) results.push(once())
const best = Math.min(...results)
console.log(JSON.stringify({ sizeMiB, runs: results.map((s) => +s.toFixed(3)), bestSeconds: +best.toFixed(3), bestMiBps: Math.round(sizeMiB / best) }))
