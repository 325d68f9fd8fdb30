// The fuzz targets (`multifd`, at the end: one multifd channel through its parser). `parser`: QEMU migration streams (the real fixture and synthetic ones
// with XBZRLE, re-sends, a libvirt header) mutated and fed in random pieces through the same
// path `create` uses (libvirt prefix -> StreamParser -> sink, XBZRLE applied). `image`: small
// real images mutated by region (header, cluster headers, payloads, trailer records, footer),
// often with their checksums recomputed so that the damage reaches the structure checks behind
// them, then opened, scanned, verified and loaded. One of them is an incremental image (record 8,
// base runs) over another, so that mutated chains are opened, verified and loaded too. Outcomes are classified by the worker.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { crc32 } from 'node:zlib'
import { PrefixSplitter, createImage } from '../../src/create.js'
import { ImageWriter } from '../../src/container/writer.js'
import { ImageReader } from '../../src/container/reader.js'
import { openImage, writerBase } from '../../src/container/chain.js'
import { FLAG_FRAMED, clusterHeaderLength } from '../../src/container/cluster.js'
import { loadImage } from '../../src/load.js'
import { verifyImage } from '../../src/verify.js'
import { imageInfo } from '../../src/info.js'
import { StreamParser } from '../../src/stream/parser.js'
import { xbzrleDecode, xbzrleEncode } from '../../src/stream/xbzrle.js'
import { makeLibvirtHeader } from '../../src/stream/libvirt.js'
import * as enc from '../../src/stream/encoder.js'
import { MultifdChannelParser, type ChannelSink } from '../../src/multifd/channel-parser.js'
import { encodeInit, encodePacketHeader } from '../../src/multifd/packet.js'
import { ERROR_CODES } from '../../src/errors.js'
import type { DeviceState, RamBlockDecl, RamSink } from '../../src/types.js'
import { caseRng, int, mutateSome, pick, pieces, type Rand, type Region } from './mutate.js'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../..')
export const FIXTURE = join(ROOT, 'test/fixtures/qemu10-pc-16M.stream')
const PAGE = 4096

export interface Prepared {
  input: Buffer
  what: string
}

export interface Target {
  prepare(n: number, rand: Rand): Prepared
  /** Runs every stage; returns the error codes the stages ended with ('ok' for success). */
  run(p: Prepared, rand: Rand, n: number): Promise<string[]>
  cleanup(): void
}

/** Throws what is not an expected outcome; returns the SnapError code otherwise. */
export type Classify = (stage: string, e: unknown) => string

function fixtureDevice(): DeviceState {
  const parser = new StreamParser({ blocks() {}, zero() {}, page() {}, xbzrle() {} })
  parser.push(readFileSync(FIXTURE))
  return parser.end()
}

// ---- parser ------------------------------------------------------------------------------

const SYNTH_BLOCKS: RamBlockDecl[] = [
  { name: 'pc.ram', size: 48 * PAGE },
  { name: 'pc.bios', size: 2 * PAGE },
  { name: '/rom@etc/acpi/rsdp', size: PAGE },
]

function pageOf(rand: Rand): Buffer {
  const b = Buffer.alloc(PAGE, int(rand, 256))
  for (let i = 0, n = int(rand, 64); i < n; i++) b[int(rand, PAGE)] = int(rand, 256)
  return b
}

/** A precopy stream with zero pages, pages, re-sends and XBZRLE deltas, built with the encoder. */
function synthStream(seed: number, device: DeviceState, libvirt: boolean): Buffer {
  const rand = caseRng(seed, 0)
  const ram = SYNTH_BLOCKS.map((b) => Buffer.alloc(b.size))
  const w = new enc.PageRecordWriter(SYNTH_BLOCKS, { chunkSize: 64 * 1024 })
  const id = device.ramSectionId
  w.raw(enc.fileHeader(device.config))
  w.raw(enc.ramStartSection({ sectionId: id, instanceId: 0, version: 4 }, SYNTH_BLOCKS))
  for (let part = 0; part < 3; part++) {
    w.raw(enc.sectionPartHeader(id))
    for (let i = 0; i < 24; i++) {
      const b = rand() < 0.8 ? 0 : int(rand, SYNTH_BLOCKS.length)
      const p = int(rand, SYNTH_BLOCKS[b].size / PAGE)
      const cur = ram[b].subarray(p * PAGE, (p + 1) * PAGE)
      const r = rand()
      if (r < 0.25) {
        w.zero(b, p)
        cur.fill(0)
      } else if (r < 0.5 && part > 0) {
        const next = Buffer.from(cur)
        for (let k = 0; k < 20; k++) next[int(rand, PAGE)] = int(rand, 256)
        const delta = xbzrleEncode(cur, next)
        if (delta && delta.length > 0) w.xbzrle(b, p, delta)
        else w.page(b, p, next)
        next.copy(cur)
      } else {
        const data = pageOf(rand)
        w.page(b, p, data)
        data.copy(cur)
      }
      if (rand() < 0.2) w.forgetBlock()
    }
    w.raw(enc.eosFooter(id))
  }
  w.raw(enc.switchoverStart())
  w.raw(enc.sectionEndHeader(id))
  w.zero(1, 0)
  w.raw(enc.eosFooter(id))
  w.raw(device.deviceSections)
  w.raw(device.streamEnd)
  const stream = Buffer.concat(w.flush())
  return libvirt ? Buffer.concat([makeLibvirtHeader('<domain><name>fuzz</name></domain>', { padding: 64 }), stream]) : stream
}

/** Checks what the parser hands out, as the image writer relies on it, and applies XBZRLE. */
class CheckingSink implements RamSink {
  private pages: number[] = []
  private readonly scratch = Buffer.alloc(PAGE)
  blocks(list: RamBlockDecl[]): void {
    if (this.pages.length) throw new Error('sink: block list twice')
    this.pages = list.map((b) => b.size / PAGE)
  }
  private check(block: number, page: number): void {
    if (!(block >= 0 && block < this.pages.length && Number.isInteger(page) && page >= 0 && page < this.pages[block])) {
      throw new Error(`sink: page ${page} of block ${block} is outside the declared blocks`)
    }
  }
  zero(block: number, page: number): void {
    this.check(block, page)
  }
  page(block: number, page: number, data: Uint8Array): void {
    this.check(block, page)
    if (data.length !== PAGE) throw new Error(`sink: a page of ${data.length} bytes`)
  }
  xbzrle(block: number, page: number, encoded: Uint8Array): void {
    this.check(block, page)
    if (encoded.length < 1 || encoded.length > PAGE) throw new Error(`sink: XBZRLE data of ${encoded.length} bytes`)
    xbzrleDecode(encoded, this.scratch)
  }
}

export function parserTarget(classify: Classify): Target {
  const device = fixtureDevice()
  const corpus = [readFileSync(FIXTURE), synthStream(1, device, false), synthStream(2, device, false), synthStream(3, device, true)]
  return {
    prepare(n, rand) {
      const base = int(rand, corpus.length)
      // Aim half of the mutations at the first 4 KiB, where the headers and the block list are.
      const m = mutateSome(corpus[base], rand, 3, () => (rand() < 0.5 ? { start: 0, end: 4096 } : undefined))
      return { input: m.out, what: `stream ${base}: ${m.what}` }
    },
    async run(p, rand) {
      try {
        const parser = new StreamParser(new CheckingSink())
        const prefix = new PrefixSplitter()
        for (const piece of pieces(p.input, rand)) {
          const rest = prefix.push(piece)
          if (rest !== null && rest.length > 0) parser.push(rest)
        }
        const rest = prefix.end()
        if (rest !== null && rest.length > 0) parser.push(rest)
        parser.end()
        return ['ok']
      } catch (e) {
        return [classify('parse', e)]
      }
    },
    cleanup() {},
  }
}

// ---- image -------------------------------------------------------------------------------

interface Base {
  bytes: Buffer
  clusters: Array<{ offset: number; pageCount: number; frames: number }>
  trailerOffset: number
  trailerLength: number
  records: Region[]
}

/** `repeats`: the share of pages that are one of 6 contents (stored once: shared runs, container.md "Shared slots"). */
async function writeSynthImage(path: string, seed: number, compress: 'lz4' | 'none', device: DeviceState, repeats = 0): Promise<void> {
  const rand = caseRng(seed, 0)
  const blocks: RamBlockDecl[] = [{ name: 'pc.ram', size: 96 * PAGE }, { name: '0000:00:02.0/vga.vram', size: 16 * PAGE }, { name: 'pc.rom', size: PAGE }]
  const w = await ImageWriter.create(path, { clusterSize: 65536, compress, dedupe: repeats > 0 })
  w.setBlocks(blocks)
  const kinds = Array.from({ length: 6 }, () => pageOf(rand))
  for (let i = 0; i < 160; i++) {
    const b = rand() < 0.8 ? 0 : int(rand, blocks.length)
    const p = int(rand, blocks[b].size / PAGE)
    if (rand() < 0.2) w.putZero(b, p)
    else w.putPage(b, p, rand() < repeats ? pick(rand, kinds) : pageOf(rand))
    if (w.needsDrain()) await w.drain()
  }
  await w.finish(device, { source: 'qemu', counters: { pages: 0, zeroPages: 0, xbzrlePages: 0, resentPages: 0, bytesIn: 0, sections: 0 } })
}

/** An incremental image over `basePath` (records 8 and base runs to mutate): half its pages unchanged. */
async function writeIncrImage(path: string, basePath: string, device: DeviceState): Promise<void> {
  const rand = caseRng(3, 0)
  const base = await openImage(basePath)
  try {
    const w = await ImageWriter.create(path, { clusterSize: 65536, base: writerBase(base, path) })
    w.setBlocks(base.blocks)
    const page = Buffer.alloc(PAGE)
    for (const b of base.blocks) {
      for (let p = 0; p < b.size / PAGE; p++) {
        const r = rand()
        if (r < 0.1) continue
        if (r < 0.2) w.putZero(b.id, p)
        else if (r < 0.4) w.putPage(b.id, p, pageOf(rand))
        else {
          w.readPage(b.id, p, page)
          w.putPage(b.id, p, page)
        }
        if (w.needsDrain()) await w.drain()
      }
    }
    await w.finish(device, { source: 'qemu', counters: { pages: 0, zeroPages: 0, xbzrlePages: 0, resentPages: 0, bytesIn: 0, sections: 0 } })
  } finally {
    await base.close()
  }
}

async function describe(path: string): Promise<Base> {
  const r = await ImageReader.open(path)
  try {
    const infos = await r.clusterInfos()
    const records: Region[] = []
    // trailer records: 8-aligned, a 16-byte header (type, flags, u64 length), then the body
    const t = readFileSync(path).subarray(r.header.trailerOffset, r.header.trailerOffset + r.header.trailerLength)
    for (let pos = 0; pos + 16 <= t.length; ) {
      const len = Number(t.readBigUInt64BE(pos + 8))
      records.push({ start: r.header.trailerOffset + pos, end: r.header.trailerOffset + pos + 16 + len })
      pos = Math.ceil((pos + 16 + len) / 8) * 8
    }
    return {
      bytes: readFileSync(path), clusters: infos.map((c) => ({ offset: c.offset, pageCount: c.pageCount, frames: c.frames })),
      trailerOffset: r.header.trailerOffset, trailerLength: r.header.trailerLength, records,
    }
  } finally {
    await r.close()
  }
}

/** Recompute every checksum where the original layout says it is, so damage gets past them. */
function fixChecksums(buf: Buffer, base: Base): void {
  const hl = buf.length >= 16 ? buf.readUInt32BE(12) : 0
  if (hl >= 192 && hl <= 4096 && buf.length >= hl) buf.writeUInt32BE(crc32(buf.subarray(0, hl - 4)), hl - 4)
  for (const c of base.clusters) {
    const at = c.offset
    if (at + 32 > buf.length) continue
    const len = buf.readUInt32BE(at + 4)
    if (len < 36 || len > clusterHeaderLength(16384) || at + len > buf.length) continue
    const stored = buf.readUInt32BE(at + 24)
    const data = at + Math.ceil(len / 4096) * 4096
    if (buf[at + 13] & FLAG_FRAMED) fixFrameChecksums(buf, at, len, data)
    else if (data + stored <= buf.length) buf.writeUInt32BE(crc32(buf.subarray(data, data + stored)), at + 28)
    buf.writeUInt32BE(crc32(buf.subarray(at, at + len - 4)), at + len - 4)
  }
  const f = buf.length - 64
  if (f < 0) return
  const to = Number(buf.readBigUInt64BE(f + 24))
  const tl = Number(buf.readBigUInt64BE(f + 32))
  if (to + tl <= f) buf.writeUInt32BE(crc32(buf.subarray(to, to + tl)), f + 40)
  buf.writeUInt32BE(crc32(buf.subarray(f, f + 60)), f + 60)
}

/** A framed cluster: each frame's crc over its bytes (as the table says they lie), then data_crc over the table. */
function fixFrameChecksums(buf: Buffer, at: number, len: number, data: number): void {
  const table = at + 32 + 8 * buf.readUInt32BE(at + 16)
  const n = (at + len - 4 - table) / 8
  if (!Number.isInteger(n) || n < 1) return
  for (let i = 0, p = data; i < n; i++) {
    const fl = buf.readUInt32BE(table + 8 * i)
    if (p + fl > buf.length) break
    buf.writeUInt32BE(crc32(buf.subarray(p, p + fl)), table + 8 * i + 4)
    p += fl
  }
  buf.writeUInt32BE(crc32(buf.subarray(table, table + 8 * n)), at + 28)
}

function imageRegion(base: Base, rand: Rand): [string, Region] {
  const len = base.bytes.length
  const c = base.clusters.length ? pick(rand, base.clusters) : null
  switch (int(rand, 7)) {
    case 0:
      return ['header', { start: 0, end: 192 }]
    case 1:
      return c ? ['cluster header', { start: c.offset, end: c.offset + clusterHeaderLength(c.pageCount, c.frames) }] : ['anywhere', { start: 0, end: len }]
    case 2:
      return c ? ['payload', { start: c.offset + Math.ceil(clusterHeaderLength(c.pageCount, c.frames) / 4096) * 4096, end: c.offset + 4096 * 8 }] : ['anywhere', { start: 0, end: len }]
    case 3:
      return ['trailer', { start: base.trailerOffset, end: base.trailerOffset + base.trailerLength }]
    case 4:
    case 5:
      return ['trailer record', pick(rand, base.records)]
    default:
      return ['footer', { start: len - 64, end: len }]
  }
}

export async function imageTarget(classify: Classify): Promise<Target> {
  const dir = mkdtempSync(join('/dev/shm', 'snapctl-fuzz-'))
  try {
    const device = fixtureDevice()
    await writeSynthImage(join(dir, 'lz4.snap'), 1, 'lz4', device)
    await writeSynthImage(join(dir, 'raw.snap'), 2, 'none', device)
    await createImage(join(dir, 'fixture.snap'), { from: FIXTURE, clusterSize: 65536 })
    // Its base is lz4.snap, beside case.snap: mutated copies of it open as a chain.
    await writeIncrImage(join(dir, 'incr.snap'), join(dir, 'lz4.snap'), device)
    await writeSynthImage(join(dir, 'shared.snap'), 4, 'lz4', device, 0.5)
    const bases = [
      await describe(join(dir, 'lz4.snap')), await describe(join(dir, 'raw.snap')), await describe(join(dir, 'fixture.snap')), await describe(join(dir, 'incr.snap')),
      await describe(join(dir, 'shared.snap')),
    ]
    const INCR = 3
    const SHARED = 4
    const path = join(dir, 'case.snap')
    const out = join(dir, 'case.stream')
    return {
      prepare(n, rand) {
        const bi = int(rand, bases.length)
        const base = bases[bi]
        // The incremental image's last record is its base_image (type 8): aimed at often, so that
        // its fields (uuid, generation, path) are damaged behind recomputed checksums.
        // The image with shared runs: its page map (record 3, third) is aimed at often too.
        const [name, region] = bi === INCR && rand() < 0.4 ? ['base_image record', base.records[base.records.length - 1]] as [string, Region]
          : bi === SHARED && rand() < 0.4 ? ['page_map record', base.records[2]] as [string, Region] : imageRegion(base, rand)
        const mutated = mutateSome(base.bytes, rand, 2, () => region)
        let input = mutated.out
        const whats = [mutated.what]
        const fix = rand() < 0.75
        if (fix) fixChecksums(input, base)
        return { input, what: `image ${bi}, ${name}: ${whats.join('; ')}${fix ? ', checksums recomputed' : ''}` }
      },
      async run(p, rand, n) {
        writeFileSync(path, p.input)
        rmSync(`${path}.index`, { recursive: true, force: true })
        const codes: string[] = []
        const stage = async (name: string, fn: () => Promise<unknown>) => {
          try {
            await fn()
            codes.push('ok')
          } catch (e) {
            codes.push(classify(name, e))
          }
        }
        await stage('open+scan', async () => {
          const r = await ImageReader.open(path)
          try {
            await r.summary()
            for await (const c of r.clusters()) if (c.raw.length !== (c.pages.length / 2) * PAGE) throw new Error('cluster decodes to the wrong length')
            for (const b of r.blocks) for (let i = 0; i < 4; i++) r.locate(b.id, int(rand, b.size / PAGE))
          } finally {
            await r.close()
          }
        })
        await stage('verify', async () => {
          const v = await verifyImage(path, { index: false })
          for (const pr of v.problems) {
            if (!(pr.code in ERROR_CODES) || pr.code === 'SNAP_INTERNAL') throw new Error(`verify reported ${pr.code}: ${pr.message}`)
          }
          if (v.ok !== (v.problems.length === 0)) throw new Error('verify: ok disagrees with its problems')
        })
        // Every 16th case goes through the page index too (LevelDB is slow next to the rest).
        const index = n % 16 === 0
        await stage('load', () => loadImage(path, { to: out, force: true, index }))
        if (index) await stage('info', () => imageInfo(path))
        return codes
      },
      cleanup() {
        rmSync(dir, { recursive: true, force: true })
      },
    }
  } catch (e) {
    rmSync(dir, { recursive: true, force: true })
    throw e
  }
}

// ---- multifd -----------------------------------------------------------------------------

const MULTIFD_BLOCKS: RamBlockDecl[] = [{ name: 'mem', size: 300 * PAGE }, { name: 'pc.bios', size: 4 * PAGE }]

/** One multifd channel as QEMU 10 sends it: initial packet, SYNC, data packets (normal + zero pages), SYNC. */
function synthChannel(seed: number): Buffer {
  const rand = caseRng(seed, 0)
  const parts: Buffer[] = [encodeInit({ uuid: Buffer.alloc(16, seed), id: seed % 4 })]
  let num = 0
  const sync = () => encodePacketHeader({ flags: 1, pagesAlloc: 0, normalPages: 0, zeroPages: 0, packetNum: BigInt(num++), ramblock: '', offsets: [] })
  parts.push(sync())
  for (let k = 0; k < 4; k++) {
    const b = rand() < 0.8 ? 0 : 1
    const pages = MULTIFD_BLOCKS[b].size / PAGE
    const n = 1 + int(rand, Math.min(pages, k === 0 ? 128 : 12))
    const chosen = new Set<number>()
    while (chosen.size < n) chosen.add(int(rand, pages))
    const list = [...chosen]
    const normal = list.filter(() => rand() < 0.7)
    const zero = list.filter((p) => !normal.includes(p))
    parts.push(encodePacketHeader({ flags: 0, pagesAlloc: 128, normalPages: normal.length, zeroPages: zero.length, packetNum: BigInt(num++), ramblock: MULTIFD_BLOCKS[b].name, offsets: [...normal, ...zero].map((p) => p * PAGE) }))
    for (const _ of normal) parts.push(pageOf(rand))
    if (rand() < 0.3) parts.push(sync())
  }
  parts.push(sync())
  return Buffer.concat(parts)
}

/** Checks what the channel parser hands out, as create relies on it. */
class CheckingChannelSink implements ChannelSink {
  private last = 0
  init(i: { uuid: Buffer; id: number }): void {
    if (i.uuid.length !== 16 || i.id < 0 || i.id > 255) throw new Error('sink: bad initial packet')
  }
  page(block: number, page: number, data: Uint8Array, epoch: number): void {
    this.check(block, page, epoch)
    if (data.length !== PAGE) throw new Error(`sink: a page of ${data.length} bytes`)
  }
  zero(block: number, page: number, epoch: number): void {
    this.check(block, page, epoch)
  }
  sync(n: number): void {
    if (n !== this.last + 1) throw new Error(`sink: SYNC ${n} after ${this.last}`)
    this.last = n
  }
  private check(block: number, page: number, epoch: number): void {
    const b = MULTIFD_BLOCKS[block]
    if (!b || !Number.isInteger(page) || page < 0 || page >= b.size / PAGE) throw new Error(`sink: page ${page} of block ${block} is outside the blocks`)
    if (epoch !== this.last) throw new Error(`sink: epoch ${epoch} after SYNC ${this.last}`)
  }
}

export function multifdTarget(classify: Classify): Target {
  const corpus = [synthChannel(1), synthChannel(2), synthChannel(3)]
  return {
    prepare(n, rand) {
      const base = int(rand, corpus.length)
      // Half aimed at the initial packet and the first headers, where the small fields are.
      const mutated = mutateSome(corpus[base], rand, 3, () => (rand() < 0.5 ? { start: 0, end: 64 + 2 * 1344 } : undefined))
      const input = mutated.out
      const whats = [mutated.what]
      return { input, what: `channel ${base}: ${whats.join('; ')}` }
    },
    async run(p, rand) {
      try {
        const parser = new MultifdChannelParser(new CheckingChannelSink(), { waitCap: 4 << 20 })
        const late = rand() < 0.3 // the block list after the data, as when the main channel lags
        if (!late) parser.setBlocks(MULTIFD_BLOCKS)
        for (const piece of pieces(p.input, rand)) parser.push(piece)
        if (late) parser.setBlocks(MULTIFD_BLOCKS)
        parser.end()
        return ['ok']
      } catch (e) {
        return [classify('channel', e)]
      }
    },
    cleanup() {},
  }
}
