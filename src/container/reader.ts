// Opens and reads an image: format-spec/container.md, "Reading an image". open() does steps
// 1-4 in the spec's order; every cluster passes step 5 before any of its pages is handed out.
import { crc32 } from 'node:zlib'
import { roundUp } from '../bytes.js'
import { SnapError, fromSystemError } from '../errors.js'
import type { DeviceState, RamBlock } from '../types.js'
import {
  clusterExtent, clusterHeaderBlock, clusterHeaderLength, decodeClusterHeader, decodeFrameSync, decodePayload, decodePayloadSync, frameExtent,
  splitCluster, type ClusterHeader, type ClusterLimits,
} from './cluster.js'
import { LocalFile, type ByteSource } from './byte-source.js'
import { isS3Url } from '../s3/url.js'
import { FOOTER_SIZE, decodeFooter, type ImageFooter } from './footer.js'
import { ALIGN, HEADER_SIZE, INCOMPAT_BASE_IMAGE, INCOMPAT_FRAMED, INCOMPAT_SHARED_SLOTS, decodeHeader, type ImageHeader } from './header.js'
import { decodeBaseImage, type BaseImageRef } from './base-image.js'
import { RunLocator, type PageLocation } from './locator.js'
import * as T from './trailer.js'

import { imageSummary, type ImageSummaryInfo } from './summary.js'

export type { PageLocation, ImageSummaryInfo }

/** Trailers are read whole; one this large is not something snapctl wrote. */
const MAX_TRAILER = 1024 * 1024 * 1024
const CHUNK_BYTES = 8 * 1024 * 1024

export interface DecodedCluster {
  seq: number
  offset: number
  codec: number
  storedLength: number
  /** page_count (block_id, page_index) pairs, in slot order */
  pages: Uint32Array
  /** the decoded payload: page_count × page_size bytes */
  raw: Buffer
  /** with clusters({ reuse: 'manual' }): gives `raw` (and the chunk it may lie in) back to the reader; once */
  release?: () => void
  /**
   * with clusters({ leaveRawFrames: true }), for a framed cluster: per frame, where its pages lie
   * in `stored` (a frame stored raw, not copied into `raw`: those bytes of `raw` are not its
   * pages), or -1 (decoded into `raw`); see pageAt()
   */
  storedFrames?: Int32Array
  /** the checked payload as read (with storedFrames) */
  stored?: Buffer
  /** pages per frame (with storedFrames) */
  framePages?: number
}

/** Where the page in `slot` lies: in `raw` (false) or in `stored` (true), and at which offset. */
export function pageAt(c: DecodedCluster, slot: number, pageSize: number): [inStored: boolean, offset: number] {
  const f = c.storedFrames
  if (f !== undefined) {
    const i = Math.floor(slot / c.framePages!)
    if (f[i] >= 0) return [true, f[i] + (slot - i * c.framePages!) * pageSize]
  }
  return [false, slot * pageSize]
}

export interface ClusterInfo {
  seq: number
  offset: number
  codec: number
  storedLength: number
  pageCount: number
  /** frames of a framed cluster, else 0 */
  frames: number
}

/** How clusterResults() and clusters() scan (see clusterResults). */
export interface ClusterScanOptions {
  readAhead?: number
  asyncDecode?: boolean
  onRead?: (bytes: number) => void
  reuse?: boolean | 'manual'
  /** makes the read and decode buffers that `reuse` keeps (default Buffer.allocUnsafeSlow) */
  alloc?: (len: number) => Buffer
  /** (sync decode) frames stored raw are left where they were read, not copied: see DecodedCluster.storedFrames */
  leaveRawFrames?: boolean
}

/** One cluster of a sequential scan: decoded, or the error that stopped it. */
export interface ClusterResult {
  seq: number
  offset: number
  cluster?: DecodedCluster
  error?: SnapError
}

const corrupt = (msg: string, details: Record<string, unknown> = {}): never => {
  throw new SnapError('SNAP_CORRUPT', msg, details)
}

export class ImageReader {
  readonly lim: ClusterLimits
  private infos: ClusterInfo[] | null = null
  private runLocator: RunLocator | null = null

  private constructor(
    /** where the bytes come from: a local file today (byte-source.ts) */
    readonly source: ByteSource,
    readonly fileLength: number,
    readonly header: ImageHeader,
    readonly footer: ImageFooter,
    readonly records: Map<number, Buffer>,
    readonly streamInfo: T.StreamInfo,
    readonly blocks: RamBlock[],
    readonly clusterOffsets: number[],
    readonly runs: T.PageRun[],
    readonly device: DeviceState,
    /** an incremental image's base (trailer record 8), else null: chain.ts opens it */
    readonly base: BaseImageRef | null,
  ) {
    this.lim = clusterLimits(header)
  }

  /** A local image or `s3://BUCKET/KEY` (checked as the spec says); or any other ByteSource, given open. */
  static async open(path: string | ByteSource, opts: { whileCreating?: 'refuse' | 'allow'; bypassCache?: boolean } = {}): Promise<ImageReader> {
    const source = typeof path !== 'string' ? path : isS3Url(path) ? await openS3(path) : await LocalFile.open(path, opts)
    try {
      return await ImageReader.check(source)
    } catch (e) {
      await source.close()
      throw fromSystemError(e, `reading ${source.path}`)
    }
  }

  get path(): string {
    return this.source.path
  }

  private static async check(src: ByteSource): Promise<ImageReader> {
    const size = await src.size()
    const header = decodeHeader(await src.read(0, Math.min(size, HEADER_SIZE)), size)
    const footerAt = size - FOOTER_SIZE
    const footer = decodeFooter(await src.read(footerAt, FOOTER_SIZE), footerAt)
    if (!footer.uuid.equals(header.uuid) || footer.trailerOffset !== header.trailerOffset ||
        footer.trailerLength !== header.trailerLength || footer.generation !== header.generation) {
      throw new SnapError('SNAP_INCOMPLETE', 'the footer does not belong to the header: the image was never finished', { offset: footerAt })
    }
    const { trailerOffset, trailerLength } = header
    if (trailerOffset < HEADER_SIZE || trailerOffset % ALIGN !== 0 || trailerOffset + trailerLength > footerAt) {
      corrupt(`the trailer (${trailerOffset}, ${trailerLength} bytes) is not between the header and the footer`, { offset: trailerOffset })
    }
    if (trailerLength > MAX_TRAILER) throw new SnapError('SNAP_TOO_LARGE', `a trailer of ${trailerLength} bytes`, { offset: trailerOffset })
    const trailer = await src.read(trailerOffset, trailerLength)
    if (crc32(trailer) !== footer.trailerCrc) throw new SnapError('SNAP_CHECKSUM', 'the trailer checksum does not match', { offset: trailerOffset })

    const at = new Map<number, number>()
    const records = T.decodeTrailer(trailer, trailerOffset, at)
    const base = baseOf(header, records, at)
    const streamInfo = T.decodeStreamInfo(records.get(T.REC_STREAM_INFO)!)
    const blocks = T.decodeBlockTable(records.get(T.REC_BLOCK_TABLE)!, header.pageSize)
    const lim = clusterLimits(header)
    const dir = records.get(T.REC_CLUSTER_DIRECTORY)
    const offsets = dir ? T.decodeClusterDirectory(dir) : await scanClusters(src, trailerOffset, lim)
    if (offsets.length !== footer.clusterCount) corrupt(`the cluster directory has ${offsets.length} clusters, the footer says ${footer.clusterCount}`)
    const maxExtent = clusterExtent(lim.maxPages, header.clusterSize, lim.framed ? lim.maxPages : 0)
    for (let i = 0; i < offsets.length; i++) {
      const start = offsets[i]
      const end = i + 1 < offsets.length ? offsets[i + 1] : trailerOffset
      if ((i === 0 && start !== HEADER_SIZE) || start % ALIGN !== 0 || end - start < 2 * ALIGN || end - start > maxExtent) {
        corrupt(`cluster ${i} has a bad offset ${start} in the cluster directory`, { cluster: i, offset: start })
      }
    }
    if (offsets.length === 0 && trailerOffset !== HEADER_SIZE) corrupt('no clusters, yet the trailer does not follow the header')
    const runs = T.decodePageMap(records.get(T.REC_PAGE_MAP)!, blocks, offsets.length, lim.maxPages, base !== null, (header.incompatibleFeatures & INCOMPAT_SHARED_SLOTS) !== 0n)
    const config = records.get(T.REC_CONFIG)!
    const device: DeviceState = {
      machine: typeof streamInfo.machine === 'string' ? streamInfo.machine : (machineFromConfig(config) ?? header.machine),
      config,
      ramSectionId: streamInfo.ramSectionId,
      ramInstanceId: streamInfo.ramInstanceId,
      ramVersion: streamInfo.ramVersion,
      switchoverStart: streamInfo.switchoverStart,
      ramEnd: streamInfo.ramEnd,
      deviceSections: records.get(T.REC_DEVICE_SECTIONS)!,
      streamEnd: records.get(T.REC_STREAM_END)!,
    }
    return new ImageReader(src, size, header, footer, records, streamInfo, blocks, offsets, runs, device, base)
  }

  blockId(nameOrId: string | number): number {
    if (typeof nameOrId === 'number') {
      if (Number.isInteger(nameOrId) && nameOrId >= 0 && nameOrId < this.blocks.length) return nameOrId
    } else {
      const b = this.blocks.find((x) => x.name === nameOrId)
      if (b) return b.id
    }
    throw new SnapError('SNAP_NO_PAGE', `the image has no RAM block ${JSON.stringify(nameOrId)}`)
  }

  /** Where every page is, per the trailer's page map (built on first use). */
  get locator(): RunLocator {
    this.runLocator ??= new RunLocator(this.blocks.map((b) => b.size / b.pageSize), this.runs, this.clusterOffsets.length)
    return this.runLocator
  }

  /** Where a page is (the spec's lookup). */
  locate(block: number, page: number): PageLocation {
    return this.locator.locate(block, page)
  }

  private extent(seq: number): [number, number] {
    const next = seq + 1 < this.clusterOffsets.length ? this.clusterOffsets[seq + 1] : this.header.trailerOffset
    return [this.clusterOffsets[seq], next]
  }

  private async decode(buf: Buffer, seq: number, offset: number, sync: boolean, into?: Buffer, leaveRawFrames = false): Promise<DecodedCluster> {
    const where = { cluster: seq, offset }
    const { header, stored } = splitCluster(buf, where, this.lim)
    const left = sync && leaveRawFrames && header.frames.length ? new Int32Array(header.frames.length / 2) : undefined
    const raw = sync ? decodePayloadSync(header, stored, where, into, left) : await decodePayload(header, stored, where)
    const c: DecodedCluster = { seq, offset, codec: header.codec, storedLength: header.storedLength, pages: header.pages, raw }
    if (left) Object.assign(c, { storedFrames: left, stored, framePages: header.framePages })
    return c
  }

  /**
   * One cluster, read on the pool. With `into`, its stored bytes are read into `into.stored` and
   * decoded on the calling thread into `into.raw` (each as large as a cluster can be): no fresh
   * memory (lazy restore's followed clusters); without, decoded on the pool into fresh buffers.
   */
  async readCluster(seq: number, into?: { stored: Buffer; raw: Buffer }): Promise<DecodedCluster> {
    const [start, end] = this.checkedExtent(seq)
    return this.decode(await this.source.read(start, end - start, into?.stored), seq, start, into !== undefined, into?.raw)
  }

  /** Buffers for readCluster(seq, into): a cluster's pages, and room for its stored bytes (a larger one reads into fresh memory). */
  clusterScratch(): { stored: Buffer; raw: Buffer } {
    const raw = this.lim.maxPages * this.lim.pageSize
    return { stored: Buffer.allocUnsafeSlow(raw + (64 << 10)), raw: Buffer.allocUnsafeSlow(raw) }
  }

  /**
   * The same, on the calling thread: for lazy restore, where a page request must not queue
   * behind bulk reads and writes in the thread pool (a 1 MiB cluster from the page cache reads,
   * checks and decodes in about a millisecond).
   */
  readClusterSync(seq: number): DecodedCluster {
    const [start, end] = this.checkedExtent(seq)
    if (!this.source.readSync) throw new SnapError('SNAP_INTERNAL', `${this.path} cannot be read synchronously`)
    const buf = this.source.readSync(start, end - start)
    const where = { cluster: seq, offset: start }
    const { header, stored } = splitCluster(buf, where, this.lim)
    const raw = decodePayloadSync(header, stored, where)
    return { seq, offset: start, codec: header.codec, storedLength: header.storedLength, pages: header.pages, raw }
  }

  /** A cluster's header alone, read and checked on the calling thread (for a page request). */
  readClusterHeaderSync(seq: number): ClusterHeader {
    const [start, end] = this.checkedExtent(seq)
    const read = this.syncRead()
    let buf = read(start, Math.min(ALIGN, end - start))
    const need = headerBlockOf(buf, this.lim)
    if (need > buf.length && need <= end - start) buf = read(start, need)
    const where = { cluster: seq, offset: start }
    const h = decodeClusterHeader(buf, 0, where, this.lim)
    if (clusterExtent(h.pageCount, h.storedLength, h.frames.length / 2) !== end - start) {
      corrupt(`cluster ${seq} at offset ${start}: its extent does not match the directory`, where)
    }
    return h
  }

  /** Frame `i` of a framed cluster whose header `h` was read: read, checked and decoded alone. */
  readFrameSync(seq: number, h: ClusterHeader, i: number, into?: Buffer): Buffer {
    const start = this.clusterOffsets[seq]
    const x = frameExtent(h, i, this.lim.pageSize)
    const at = start + clusterHeaderBlock(h.pageCount, h.frames.length / 2) + x.start
    return decodeFrameSync(h, i, this.syncRead()(at, x.end - x.start), { cluster: seq, offset: start }, into ?? Buffer.allocUnsafe(x.rawLength))
  }

  private syncRead(): (pos: number, len: number) => Buffer {
    if (!this.source.readSync) throw new SnapError('SNAP_INTERNAL', `${this.path} cannot be read synchronously`)
    return this.source.readSync.bind(this.source)
  }

  private checkedExtent(seq: number): [number, number] {
    if (!(Number.isInteger(seq) && seq >= 0 && seq < this.clusterOffsets.length)) {
      throw new SnapError('SNAP_CORRUPT', `there is no cluster ${seq}`, { cluster: seq })
    }
    return this.extent(seq)
  }

  /**
   * Every cluster in file order, read in large chunks (two ahead) and decoded `readAhead` at a
   * time; a cluster that fails a check comes back with its error and the scan goes on.
   * LZ4 decodes on the calling thread unless `asyncDecode`: lz4-napi's async call costs more
   * than the decode itself (measured on 2 cores: 238 ms async vs 83 ms sync for 218 MiB), and the
   * chunk reads still overlap it. readCluster (random access, lazy restore) decodes async.
   * `reuse` (sync decode only): chunks are read into, and clusters decoded into, a few buffers
   * used over and over, so a scan touches no fresh memory; a cluster's `raw` is then valid only
   * until the caller asks for the next one. `reuse: 'manual'`: valid until the caller calls the
   * cluster's release() (a socket writer that queues `raw` without copying it); buffers not yet
   * released are not reused, so the caller bounds how many it holds. `alloc` makes those buffers
   * (load: in shared memory, for its writer thread to write pages from in place).
   */
  async *clusterResults(opts: ClusterScanOptions = {}): AsyncGenerator<ClusterResult> {
    const readAhead = Math.max(1, opts.readAhead ?? 4)
    const reuse = (opts.reuse === true || opts.reuse === 'manual') && !opts.asyncDecode
    const manual = reuse && opts.reuse === 'manual'
    const n = this.clusterOffsets.length
    type Chunk = { first: number; last: number; start: number; end: number; into?: Buffer; left: number }
    const chunks: Chunk[] = []
    for (let i = 0; i < n; ) {
      const start = this.clusterOffsets[i]
      let j = i
      while (j + 1 < n && this.extent(j + 1)[1] - start <= CHUNK_BYTES) j++
      chunks.push({ first: i, last: j, start, end: this.extent(j)[1], left: j - i + 1 })
      i = j + 1
    }
    const freeChunks: Buffer[] = []
    const freeRaws: Buffer[] = []
    const clusterBytes = this.lim.maxPages * this.lim.pageSize
    const fresh = opts.alloc ?? Buffer.allocUnsafeSlow
    const reads: Array<Promise<Buffer>> = []
    let next = 0
    const issue = () => {
      while (reads.length < 2 && next < chunks.length) {
        const c = chunks[next++]
        if (reuse && c.end - c.start <= CHUNK_BYTES) c.into = freeChunks.pop() ?? this.source.buffer?.(CHUNK_BYTES, fresh) ?? fresh(CHUNK_BYTES)
        const p = this.source.read(c.start, c.end - c.start, c.into)
        p.catch(() => {})
        reads.push(p)
      }
    }
    issue()
    type Pending = { result: Promise<ClusterResult>; chunk: Chunk; into?: Buffer }
    const pending: Pending[] = []
    // Called when the caller comes back for the next cluster: what the last one used is free.
    const release = (q: Pending) => {
      if (q.into) freeRaws.push(q.into)
      if (--q.chunk.left === 0 && q.chunk.into) freeChunks.push(q.chunk.into)
    }
    const handOut = async (q: Pending): Promise<ClusterResult> => {
      const r = await q.result
      if (!manual || !r.cluster) return r
      let held = true
      r.cluster.release = () => {
        if (held) release(q)
        held = false
      }
      return r
    }
    for (const c of chunks) {
      let buf: Buffer | null = null
      let readError: SnapError | undefined
      try {
        buf = await reads.shift()!
        opts.onRead?.(buf.length)
      } catch (e) {
        readError = fromSystemError(e, 'reading the image')
        c.into = undefined
      }
      issue()
      for (let s = c.first; s <= c.last; s++) {
        const [a, b] = this.extent(s)
        const into = reuse && buf ? (freeRaws.pop() ?? fresh(clusterBytes)) : undefined
        const p: Promise<ClusterResult> = buf
          ? this.decode(buf.subarray(a - c.start, b - c.start), s, a, !opts.asyncDecode, into, opts.leaveRawFrames).then(
              (cluster) => ({ seq: s, offset: a, cluster }),
              (e) => ({ seq: s, offset: a, error: fromSystemError(e, `cluster ${s}`) }),
            )
          : Promise.resolve({ seq: s, offset: a, error: readError })
        pending.push({ result: p, chunk: c, into })
        while (pending.length >= readAhead) {
          const q = pending.shift()!
          const r = await handOut(q)
          yield r
          if (!r.cluster?.release) release(q)
        }
      }
    }
    while (pending.length > 0) {
      const q = pending.shift()!
      const r = await handOut(q)
      yield r
      if (!r.cluster?.release) release(q)
    }
  }

  /** Every cluster in file order; throws the first cluster's error. */
  async *clusters(opts: ClusterScanOptions = {}): AsyncGenerator<DecodedCluster> {
    for await (const r of this.clusterResults(opts)) {
      if (r.error) throw r.error
      yield r.cluster!
    }
  }

  /** Headers of every cluster (checked, payloads not read), cached. */
  async clusterInfos(): Promise<ClusterInfo[]> {
    if (this.infos) return this.infos
    const out: ClusterInfo[] = new Array(this.clusterOffsets.length)
    const one = async (seq: number) => {
      const [start, end] = this.extent(seq)
      let buf = await this.source.read(start, Math.min(ALIGN, end - start))
      const need = headerBlockOf(buf, this.lim)
      if (need > buf.length && need <= end - start) buf = await this.source.read(start, need)
      const h = decodeClusterHeader(buf, 0, { cluster: seq, offset: start }, this.lim)
      if (clusterExtent(h.pageCount, h.storedLength, h.frames.length / 2) !== end - start) {
        corrupt(`cluster ${seq} at offset ${start}: its extent does not match the directory`, { cluster: seq, offset: start })
      }
      out[seq] = { seq, offset: start, codec: h.codec, storedLength: h.storedLength, pageCount: h.pageCount, frames: h.frames.length / 2 }
    }
    for (let i = 0; i < out.length; i += 64) {
      const batch: Array<Promise<void>> = []
      for (let s = i; s < Math.min(out.length, i + 64); s++) batch.push(one(s))
      await Promise.all(batch)
    }
    this.infos = out
    return out
  }

  async summary(): Promise<ImageSummaryInfo> {
    return imageSummary(this)
  }

  async close(): Promise<void> {
    await this.source.close()
  }
}

/** The object-storage source, loaded only for s3:// images (the AWS SDK takes ~0.3 s to load). */
async function openS3(path: string): Promise<ByteSource> {
  const { S3Source } = await import('./s3-source.js')
  return S3Source.open(path)
}

/** Incompatible bit 0, base_image_offset and record 8 go together (container.md, "base_image"). */
function baseOf(header: ImageHeader, records: Map<number, Buffer>, at: Map<number, number>): BaseImageRef | null {
  const body = records.get(T.REC_BASE_IMAGE)
  if ((header.incompatibleFeatures & INCOMPAT_BASE_IMAGE) === 0n) {
    if (body) corrupt('a base_image record in an image without incompatible bit 0')
    return null
  }
  if (!body || at.get(T.REC_BASE_IMAGE) !== header.baseImageOffset) {
    corrupt(`base_image_offset ${header.baseImageOffset} does not point at a base_image record`, { offset: header.baseImageOffset })
  }
  return decodeBaseImage(body!)
}

function clusterLimits(h: ImageHeader): ClusterLimits {
  return { pageSize: h.pageSize, maxPages: h.clusterSize / h.pageSize, framed: (h.incompatibleFeatures & INCOMPAT_FRAMED) !== 0n }
}

/** The header block a cluster header claims (its header_length at byte 4, rounded up), when sane. */
function headerBlockOf(buf: Buffer, lim: ClusterLimits): number {
  const len = buf.length >= 8 ? buf.readUInt32BE(4) : 0
  return len <= clusterHeaderLength(lim.maxPages, lim.framed ? lim.maxPages : 0) ? roundUp(len, ALIGN) : ALIGN
}

/** QEMU_VM_CONFIGURATION: 0x07, be32 length, the machine type name. */
function machineFromConfig(config: Buffer): string | undefined {
  if (config.length < 5 || config[0] !== 0x07) return undefined
  const n = config.readUInt32BE(1)
  return n <= config.length - 5 ? config.subarray(5, 5 + n).toString('latin1') : undefined
}

/** Without a cluster directory (record 7 is optional), walk the cluster headers. */
async function scanClusters(src: ByteSource, trailerOffset: number, lim: ClusterLimits): Promise<number[]> {
  const offsets: number[] = []
  for (let pos = HEADER_SIZE; pos < trailerOffset; ) {
    const where = { cluster: offsets.length, offset: pos }
    let buf = await src.read(pos, Math.min(ALIGN, trailerOffset - pos))
    const need = headerBlockOf(buf, lim)
    if (need > buf.length && pos + need <= trailerOffset) buf = await src.read(pos, need)
    const h = decodeClusterHeader(buf, 0, where, lim)
    offsets.push(pos)
    pos += clusterExtent(h.pageCount, h.storedLength, h.frames.length / 2)
    if (pos > trailerOffset) corrupt(`cluster ${where.cluster} runs past the trailer`, where)
  }
  return offsets
}
