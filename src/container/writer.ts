// Writes an image: format-spec/container.md, "Writing an image". Pages are copied once into
// the open cluster's buffer; a sealed cluster is compressed and written by ClusterFile while
// the stream goes on. The page map keeps only the newest copy of each page.
import { randomBytes } from 'node:crypto'
import { lstat, unlink } from 'node:fs/promises'
import { dirname, resolve } from 'node:path'
import { crc32 } from 'node:zlib'
import { roundUp } from '../bytes.js'
import { SnapError, fromSystemError } from '../errors.js'
import { renameIntoPlace } from '../paths.js'
import { PAGE_BASE, PAGE_DATA, PAGE_NEVER_SENT, PAGE_ZERO, type DeviceState, type PageState, type RamBlock, type RamBlockDecl, type StreamCounters } from '../types.js'
import { CODEC_LZ4, CODEC_NONE, DEFAULT_FRAME_PAGES, encodeFrames, encodeFramesAsync } from './cluster.js'
import { ClusterFile, fsyncDir, type ClusterFileOptions, type Stored } from './cluster-file.js'
import { copyLive, copyZeros } from './compaction.js'
import { SlotFinder, type DedupeStats } from './dedupe.js'
import { FOOTER_SIZE, encodeFooter } from './footer.js'
import {
  ALIGN, COMPAT_XBZRLE_SOURCE, DEFAULT_CLUSTER_SIZE, HEADER_LENGTH_V1, INCOMPAT_BASE_IMAGE, INCOMPAT_FRAMED, INCOMPAT_SHARED_SLOTS, MAX_CLUSTER_SIZE, MIN_CLUSTER_SIZE, PAGE_SIZE,
  encodeHeader, isPowerOfTwo,
} from './header.js'
import { localIndexPath } from './byte-source.js'
import { holds, listPartials, lockedError, partialPath, runningCreates } from './lock.js'
import { LOC_BASE, LOC_NEVER_SENT, LOC_ZERO, PageMap } from './locator.js'
import { encodeBaseImage, type BaseImageRef } from './base-image.js'
import * as T from './trailer.js'
import type * as PageIndexModule from '../index/page-index.js'
import { isS3Url } from '../s3/url.js'

// LevelDB is loaded while pages stream in, not before the first byte is read.
let indexModule: Promise<typeof PageIndexModule>

/** Clusters being compressed or written before needsDrain() says stop (with --threads N: N, if more). */
const MAX_INFLIGHT = 2
/** Rewrite the image before finishing when dead bytes pass this share of it (spec: keep ≤ 2%). */
const COMPACT_AT = 0.01
export const CREATOR = 'snapctl/0.1.0'

export interface WriterOptions {
  clusterSize?: number
  compress?: 'lz4' | 'none'
  force?: boolean
  /**
   * fdatasync the image before it gets its name, and fsync the directory after. Off by default,
   * like QEMU's own file: and `cat > FILE`: the image is renamed into place only once complete,
   * so a dying create never leaves a valid-looking file, and a power loss that loses unsynced
   * data shows up as a checksum error at load, never as wrong memory. On: also durable.
   */
  sync?: boolean
  /** bytes of recently sealed clusters kept decoded for readPage (default 16 MiB) */
  cacheBytes?: number
  /**
   * write the image with O_DIRECT, around the page cache (container/direct-io.ts); on a
   * filesystem that refuses it, through the cache, and `note` says so
   */
  bypassCache?: boolean
  /** write an incremental image: pages equal to what this base restores are stored as base runs */
  base?: WriterBase
  /**
   * store a page whose bytes a slot of the image already holds once: it points at that slot (a
   * shared run, container.md "Shared slots"; confirmed byte for byte). Default off: on the
   * bench's mix and the Linux guest it cost 1.2x to 1.3x create's CPU for 0.1% to 1% of the image
   */
  dedupe?: boolean
  /**
   * threads creating the image: 1 (default) compresses each sealed cluster on the calling
   * thread; N > 1 compresses up to N - 1 clusters at once on libuv pool threads (native/lz4
   * encodeFramesAsync) while the calling thread goes on parsing. The image's bytes are the same.
   */
  threads?: number
  /** s3:// images: where the spool file is written (default $TMPDIR) and the index built (the read cache) */
  spoolDir?: string
  cacheDir?: string
}

/**
 * Where an image goes instead of a rename into place (object storage: s3-upload.ts). The writer
 * writes the spool file as it writes a local partial one and tells the sink how far it is final.
 */
export interface ImageSink {
  readonly spool: string
  /** where the page index is built */
  readonly indexDir: string
  /** the spool is final before `end` (the header block aside) */
  progress(end: number): void
  /** the image is being rewritten (compaction) into this new spool */
  restart(spool: string): Promise<void>
  /** the spool is the whole image, `length` bytes: publish it */
  publish(length: number): Promise<void>
  /** remove everything of this image */
  abort(): Promise<void>
}

/**
 * What the writer asks of the base of an incremental image (container.md, "Incremental images";
 * chain.ts implements it over a chain of images).
 */
export interface WriterBase {
  /** trailer record 8, its path relative to the new image's directory */
  ref: BaseImageRef
  /** the base's RAM blocks: the stream must declare the same */
  blocks: RamBlock[]
  /** whether the base restores exactly `data` at (block, page); `null`: a zero page */
  same(block: number, page: number, data: Uint8Array | null): boolean
  /** what the base restores at (block, page), into `into` (zeroes where it has no data) */
  read(block: number, page: number, into: Buffer): void
}

/**
 * With --sync and without --bypass-cache: fdatasync every this many bytes while writing, so that
 * the last one, before the image gets its name, has at most this much left to write back.
 * Measured (1 GiB VM, 481 MiB image, create --from, 9 alternations, shared 2-core machine): the
 * final fdatasync alone took 0.19 s here (the virtual disk is fast); every 32 MiB cost 1.22x of
 * a create without --sync, every 128 MiB 1.11x (each fdatasync also commits the journal).
 */
const SYNC_EVERY = 128 * 1024 * 1024

export interface FinishInfo {
  source: 'qemu' | 'libvirt'
  counters: StreamCounters
  libvirtHeader?: Buffer
  compatibleFeatures?: number
}

export interface ImageSummary {
  path: string
  uuid: string
  clusters: number
  fileBytes: number
  /** payload bytes as stored (after compression) */
  storedBytes: number
  /** bytes of page data the stored pages hold, decoded */
  rawBytes: number
  deadBytes: number
  /** pages the image holds: storedPages + zeroPages */
  pages: number
  zeroPages: number
  storedPages: number
  /** an incremental image's pages taken from its base (0 without a base) */
  basePages: number
  /** stored pages that point at a slot another page (or an older copy) has: not stored again */
  sharedPages: number
  /** every page of the RAM blocks (pages QEMU never sent included) and their bytes */
  ramPages: number
  ramBytes: number
  /** the image was rewritten to drop dead copies of re-sent pages */
  compacted: boolean
  indexPath: string
  /** the image is complete but its index could not be built (commands rebuild it) */
  indexError?: string
}

export class ImageWriter {
  private map: PageMap | null = null
  private blocks: RamBlock[] = []
  private buf: Buffer
  private pages: Uint32Array
  private count = 0
  /** sequence number the open cluster will get */
  private seq = 0
  private readonly ppc: number
  private readonly uuid = randomBytes(16)
  private readonly createdAt = Date.now()
  /** the partial file being compacted away, until compaction is done */
  private old: ClusterFile | null = null
  private state: 'open' | 'finishing' | 'done' | 'aborted' = 'open'
  /**
   * Cluster buffers are reused once written and out of the cache: fresh 1 MiB buffers cost a
   * page fault per 4 KiB and garbage the collector only frees late (RSS).
   */
  private readonly spare: Buffer[] = []
  private readonly ours = new WeakSet<ArrayBufferLike>()
  /** the same for the buffers clusters are compressed into, free again once written */
  private readonly spareStored: Buffer[] = []
  private readonly oursStored = new WeakSet<ArrayBufferLike>()
  /** proposes slots that may hold a page's bytes already (null: without --dedupe) */
  private finder: SlotFinder | null = null
  /** slots of the open cluster that shared pages point at: never moved or overwritten */
  private readonly sharedSlot: Uint8Array
  /** pages the open cluster names that no longer live there (they left a slot still shared) */
  private staleNames = 0
  /** clusters being compressed or written before needsDrain() says stop: enough to keep every thread busy */
  private readonly maxInflight: number
  /** with threads > 1: clusters compressing on the pool, and those waiting for a thread */
  private compressing = 0
  private readonly waitingToCompress: Array<() => void> = []

  private constructor(
    readonly path: string,
    private partialPath: string,
    private file: ClusterFile,
    private readonly clusterSize: number,
    private readonly lz4: boolean,
    private readonly force: boolean,
    private readonly sync: boolean,
    private readonly fileOpts: ClusterFileOptions,
    private readonly base: WriterBase | null,
    private readonly sink: ImageSink | null = null,
    private readonly dedupe = false,
    private readonly threads = 1,
  ) {
    this.ppc = clusterSize / PAGE_SIZE
    this.maxInflight = Math.max(MAX_INFLIGHT, threads)
    this.sharedSlot = new Uint8Array(this.ppc)
    this.watch(this.file)
    if (sink) this.file.onWritten = (end) => sink.progress(end)
    this.buf = this.newBuffer()
    this.pages = new Uint32Array(2 * this.ppc)
  }

  static async create(path: string, opts: WriterOptions = {}): Promise<ImageWriter> {
    indexModule ??= import('../index/page-index.js')
    const clusterSize = opts.clusterSize ?? DEFAULT_CLUSTER_SIZE
    if (!isPowerOfTwo(clusterSize) || clusterSize < MIN_CLUSTER_SIZE || clusterSize > MAX_CLUSTER_SIZE) {
      throw new SnapError('SNAP_USAGE', `cluster size ${clusterSize} must be a power of two from 64 KiB to 64 MiB`)
    }
    if (isS3Url(path)) return ImageWriter.toObject(path, clusterSize, opts)
    path = resolve(path)
    if (!opts.force && (await exists(path))) throw new SnapError('SNAP_EXISTS', `${path} exists (use --force to replace it)`)
    // A partial file nobody holds open is what a killed create left: remove it.
    for (const p of await listPartials(path)) {
      if (!(await holds(p.pid, p.file))) await unlink(p.file).catch(() => {})
    }
    const partial = partialPath(path)
    const fileOpts: ClusterFileOptions = { bypassCache: opts.bypassCache, syncEvery: opts.sync ? SYNC_EVERY : undefined }
    const file = await ClusterFile.create(partial, { pageSize: PAGE_SIZE, maxPages: clusterSize / PAGE_SIZE, framed: true }, { ...fileOpts, lruBytes: opts.cacheBytes })
    // Our partial exists before we look, so of two creates that start together the later one
    // always sees the earlier (in an exact tie both see each other and both refuse).
    const running = await runningCreates(path).catch(async (e) => {
      await file.close().catch(() => {})
      await unlink(partial).catch(() => {})
      throw e
    })
    if (running.length > 0) {
      await file.close().catch(() => {})
      await unlink(partial).catch(() => {})
      throw lockedError(path, running)
    }
    return new ImageWriter(path, partial, file, clusterSize, (opts.compress ?? 'lz4') === 'lz4', opts.force ?? false, opts.sync ?? false, fileOpts, opts.base ?? null, null, opts.dedupe ?? false, threadCount(opts.threads))
  }

  /** What deduplication did so far (null: off). */
  get dedupeStats(): DedupeStats | null {
    return this.finder?.stats ?? null
  }

  /** Why --bypass-cache could not be honoured (the filesystem refuses O_DIRECT), for the caller to print. */
  get note(): string | null {
    return this.file.note
  }

  /** An s3:// image: written to a local spool and uploaded as it grows (s3-upload.ts). */
  private static async toObject(url: string, clusterSize: number, opts: WriterOptions): Promise<ImageWriter> {
    const { S3Upload } = await import('./s3-upload.js')
    const sink = await S3Upload.start(url, { force: opts.force, spoolDir: opts.spoolDir, cacheDir: opts.cacheDir })
    try {
      // Through the page cache whatever --bypass-cache says: the upload reads the spool right back.
      const fileOpts: ClusterFileOptions = {}
      const file = await ClusterFile.create(sink.spool, { pageSize: PAGE_SIZE, maxPages: clusterSize / PAGE_SIZE, framed: true }, { lruBytes: opts.cacheBytes })
      return new ImageWriter(url, sink.spool, file, clusterSize, (opts.compress ?? 'lz4') === 'lz4', opts.force ?? false, false, fileOpts, null, sink, opts.dedupe ?? false, threadCount(opts.threads))
    } catch (e) {
      await sink.abort()
      throw e
    }
  }

  setBlocks(blocks: RamBlockDecl[]): void {
    if (this.map) throw new SnapError('SNAP_INTERNAL', 'setBlocks called twice')
    if (blocks.length < 1 || blocks.length > T.MAX_BLOCKS) throw new SnapError('SNAP_STREAM_CORRUPT', `${blocks.length} RAM blocks (1 to ${T.MAX_BLOCKS} allowed)`)
    const names = new Set<string>()
    for (const b of blocks) {
      const n = Buffer.byteLength(b.name, 'latin1')
      if (n < 1 || n > 255 || names.has(b.name)) throw new SnapError('SNAP_STREAM_CORRUPT', `bad or repeated RAM block name "${b.name.slice(0, 60)}"`)
      if (!Number.isSafeInteger(b.size) || b.size < 0 || b.size % PAGE_SIZE !== 0 || b.size / PAGE_SIZE > 0xffffffff) {
        throw new SnapError('SNAP_STREAM_CORRUPT', `RAM block ${b.name} has a bad size ${b.size}`)
      }
      names.add(b.name)
    }
    const base = this.base?.blocks
    if (base && (base.length !== blocks.length || base.some((b, i) => b.name !== blocks[i].name || b.size !== blocks[i].size))) {
      throw new SnapError('SNAP_BASE_MISMATCH', `the base has RAM blocks ${describeBlocks(base)}, the stream ${describeBlocks(blocks)}: not a save of the same VM`)
    }
    this.blocks = blocks.map((b, id) => ({ id, name: b.name, size: b.size, pageSize: PAGE_SIZE }))
    this.map = new PageMap(blocks.map((b) => b.size / PAGE_SIZE))
    if (this.dedupe) this.finder = new SlotFinder(blocks.reduce((n, b) => n + b.size / PAGE_SIZE, 0))
  }

  private check(block: number, page: number): PageMap {
    const map = this.map
    if (!map || (this.state !== 'open' && !this.old)) throw new SnapError('SNAP_INTERNAL', 'no blocks declared, or the writer is closed')
    if (this.file.failure) throw this.file.failure
    const loc = map.loc[block]
    if (loc === undefined || !(page >= 0 && page < loc.length)) {
      throw new SnapError('SNAP_STREAM_CORRUPT', `page ${page} of block ${block} is outside the RAM blocks`)
    }
    return map
  }

  putPage(block: number, page: number, data: Uint8Array): void {
    const map = this.check(block, page)
    if (data.length !== PAGE_SIZE) throw new SnapError('SNAP_INTERNAL', `a page of ${data.length} bytes`)
    // Compared before anything is copied or compressed: an unchanged page costs no bytes.
    if (this.base?.same(block, page, data)) {
      this.vacate(map, block, page)
      map.setBase(block, page)
      return
    }
    const loc = map.loc[block][page]
    const at = map.slot[block][page]
    const owns = loc === this.seq + 1 && this.names(at, block, page)
    const fp = this.finder ? SlotFinder.fingerprint(data) : 0
    if (owns && this.sharedSlot[at] === 0) {
      // Re-sent while its cluster is still open: replace it in place, no dead copy.
      this.buf.set(data, at * PAGE_SIZE)
      this.finder?.remember(fp, this.seq, at)
      return
    }
    if (this.finder && this.share(map, block, page, fp, data, loc, at)) return
    // A page is named at most once in a cluster: one that left a slot others still share goes on in the next.
    if (owns || (this.staleNames > 0 && this.named(block, page))) this.seal()
    const s = this.count++
    this.buf.set(data, s * PAGE_SIZE)
    this.pages[2 * s] = block
    this.pages[2 * s + 1] = page
    map.setData(block, page, this.seq, s)
    this.finder?.remember(fp, this.seq, s)
    if (this.count === this.ppc) this.seal()
  }

  /**
   * Point the page at a slot that holds its bytes already, if the finder proposes one and the
   * bytes agree (container.md "Shared slots"): whether it did. `loc`/`now`: where the page is now.
   */
  private share(map: PageMap, block: number, page: number, fp: number, data: Uint8Array, loc: number, now: number): boolean {
    const finder = this.finder!
    const got = finder.propose(fp)
    if (!got) return false
    const { cluster, slot } = got
    let raw: Buffer | undefined
    let read = false
    let at = slot * PAGE_SIZE
    const hot = finder.hot(cluster, slot)
    if (hot) {
      raw = hot
      at = 0
    } else if (cluster === this.seq) {
      if (slot >= this.count) return false
      raw = this.buf
    } else {
      raw = this.file.cached(cluster)
      if (raw === undefined) {
        if (!finder.mayRead()) return false
        finder.stats.clusterReads++
        raw = this.file.rawSync(cluster)
        read = true
      }
      if (slot >= raw.length / PAGE_SIZE) return false
    }
    const same = raw.compare(data, 0, PAGE_SIZE, at, at + PAGE_SIZE) === 0
    if (read && same) finder.stats.readsPaid++
    if (!same) return false
    finder.stats.confirmed++
    if (loc === cluster + 1 && now === slot) return true // re-sent as it is stored
    this.vacate(map, block, page) // a page that owned a shared slot leaves it and its name there (staleNames)
    map.setShared(block, page, cluster, slot)
    if (cluster === this.seq) this.sharedSlot[slot] = 1
    finder.keep(cluster, slot, data)
    return true
  }

  /** Whether slot `slot` of the open cluster is named (block, page). */
  private names(slot: number, block: number, page: number): boolean {
    return slot < this.count && this.pages[2 * slot] === block && this.pages[2 * slot + 1] === page
  }

  /** Whether the open cluster names (block, page) in any slot. */
  private named(block: number, page: number): boolean {
    for (let s = 0; s < this.count; s++) if (this.pages[2 * s] === block && this.pages[2 * s + 1] === page) return true
    return false
  }

  putZero(block: number, page: number): void {
    const map = this.check(block, page)
    this.vacate(map, block, page)
    if (this.base?.same(block, page, null)) map.setBase(block, page)
    else map.setZero(block, page)
  }

  /**
   * A page of the open cluster leaves it: its slot is filled with the last page, so no dead slot
   * is written, unless either slot is shared (then the slot stays, and its name: staleNames).
   */
  private vacate(map: PageMap, block: number, page: number): void {
    const hole = map.slot[block][page]
    if (map.loc[block][page] !== this.seq + 1 || !this.names(hole, block, page)) return
    const last = this.count - 1
    if (this.sharedSlot[hole] !== 0 || this.sharedSlot[last] !== 0) {
      this.staleNames++
      return
    }
    this.count--
    if (hole !== last) {
      this.buf.copy(this.buf, hole * PAGE_SIZE, last * PAGE_SIZE, (last + 1) * PAGE_SIZE)
      const b = this.pages[2 * last]
      const p = this.pages[2 * last + 1]
      this.pages[2 * hole] = b
      this.pages[2 * hole + 1] = p
      map.moveSlot(b, p, hole)
    }
  }

  readPage(block: number, page: number, into: Buffer): PageState {
    const map = this.check(block, page)
    const loc = map.loc[block][page]
    if (loc === LOC_BASE) {
      this.base!.read(block, page, into)
      return PAGE_BASE
    }
    if (loc === LOC_NEVER_SENT || loc === LOC_ZERO) {
      into.fill(0, 0, PAGE_SIZE)
      return loc === LOC_NEVER_SENT ? PAGE_NEVER_SENT : PAGE_ZERO
    }
    const slot = map.slot[block][page]
    const raw = loc === this.seq + 1 ? this.buf : this.file.rawSync(loc - 1)
    raw.copy(into, 0, slot * PAGE_SIZE, (slot + 1) * PAGE_SIZE)
    return PAGE_DATA
  }

  needsDrain(): boolean {
    return this.file.inflight > this.maxInflight || this.file.failure !== null
  }

  async drain(): Promise<void> {
    await this.file.waitBelow(this.maxInflight)
  }

  private seal(): void {
    const n = this.count
    if (n === 0) return
    const raw = this.buf.subarray(0, n * PAGE_SIZE)
    const pages = this.pages.slice(0, 2 * n)
    // Compressed here, on the main thread, into a buffer reused once written (native/lz4 through
    // lz4-block.ts). lz4-napi's compressSync allocated each output (and on the libuv pool its async
    // call copied the input first): 1 GiB stream, --from FILE, 1.9 CPU-s against 1.2 here.
    // In frames of 128 KiB, each decodable alone: a page request reads and decodes one frame, not
    // the megabyte around it (format-spec/container.md, "Frames").
    let stored: Promise<Stored> = Promise.resolve({ codec: CODEC_NONE, stored: raw })
    if (this.lz4 && this.threads > 1) stored = this.compressOnPool(raw)
    else if (this.lz4) {
      const framePages = Math.min(DEFAULT_FRAME_PAGES, this.ppc) // a frame is at most a cluster
      const out = this.spareStored.pop() ?? this.newStoredBuffer()
      const f = encodeFrames(raw, PAGE_SIZE, framePages, out)
      if (f) stored = Promise.resolve({ codec: CODEC_LZ4, stored: f.stored, framePages, frames: f.frames })
      else this.spareStored.push(out)
    }
    this.file.enqueue(this.seq++, pages, n, raw, stored)
    this.buf = this.newBuffer()
    this.count = 0
    this.sharedSlot.fill(0)
    this.staleNames = 0
  }

  /**
   * --threads N > 1: the sealed cluster's frames compressed (and their CRCs taken) on a pool
   * thread, at most N - 1 at once, while this thread parses on. ClusterFile writes clusters in
   * sequence order whenever each finishes, so the image is the same as with one thread.
   */
  private async compressOnPool(raw: Buffer): Promise<Stored> {
    if (this.compressing >= this.threads - 1) await new Promise<void>((r) => this.waitingToCompress.push(r))
    this.compressing++
    const out = this.spareStored.pop() ?? this.newStoredBuffer()
    const framePages = Math.min(DEFAULT_FRAME_PAGES, this.ppc)
    try {
      const f = await encodeFramesAsync(raw, PAGE_SIZE, framePages, out)
      if (f) return { codec: CODEC_LZ4, stored: f.stored, framePages, frames: f.frames }
      this.spareStored.push(out)
      return { codec: CODEC_NONE, stored: raw }
    } finally {
      this.compressing--
      this.waitingToCompress.shift()?.()
    }
  }

  private newStoredBuffer(): Buffer {
    const b = Buffer.allocUnsafeSlow(this.clusterSize)
    this.oursStored.add(b.buffer)
    return b
  }

  /** Buffers come back from `file` for reuse: raw pages out of its cache, payloads once written. */
  private watch(file: ClusterFile): void {
    file.onEvict = (b) => this.recycle(b)
    file.onStoredWritten = (b) => {
      if (b.byteOffset === 0 && this.oursStored.has(b.buffer) && this.spareStored.length < this.maxInflight + 2) {
        this.spareStored.push(Buffer.from(b.buffer, 0, this.clusterSize))
      }
    }
  }

  private newBuffer(): Buffer {
    const b = this.spare.pop() ?? Buffer.allocUnsafeSlow(this.clusterSize)
    this.ours.add(b.buffer)
    return b
  }

  private recycle(raw: Buffer): void {
    if (raw.byteOffset === 0 && this.ours.has(raw.buffer) && this.spare.length < 4) {
      this.spare.push(Buffer.from(raw.buffer, 0, this.clusterSize))
    }
  }

  async finish(device: DeviceState, info: FinishInfo): Promise<ImageSummary> {
    if (!this.map || this.state !== 'open') throw new SnapError('SNAP_INTERNAL', 'finish without blocks, or twice')
    this.state = 'finishing'
    try {
      this.seal()
      await this.file.flush()
      const f = this.file
      let compacted = false
      if (this.map.deadBytes(f.pageCounts, f.storedLengths) > COMPACT_AT * f.dataEnd) {
        await this.compact()
        compacted = true
      }
      const summary = await this.writeEnd(device, info, compacted)
      this.state = 'done'
      return summary
    } catch (e) {
      const where = this.partialPath || this.path
      await this.abort()
      throw fromSystemError(e, `writing ${where}`)
    }
  }

  /** Copy the live pages into a new partial file: fully live clusters verbatim, the rest re-clustered. */
  private async compact(): Promise<void> {
    const old = this.file
    const oldMap = this.map!
    const map = new PageMap(this.blocks.map((b) => b.size / PAGE_SIZE))
    copyZeros(oldMap, map)
    this.old = old
    this.file = await ClusterFile.create(`${this.partialPath}.compact`, old.lim, this.fileOpts)
    this.watch(this.file)
    if (this.sink) {
      const sink = this.sink
      await sink.restart(this.file.path)
      this.file.onWritten = (end) => sink.progress(end)
    }
    this.map = map
    this.seq = 0
    this.finder?.clear()
    await copyLive(old, oldMap, {
      file: this.file,
      map,
      nextSeq: () => this.seq++,
      putPage: (b, p, data) => this.putPage(b, p, data),
      putShared: (b, p, seq, slot) => map.setShared(b, p, seq, slot),
      maxInflight: this.maxInflight,
    })
    this.seal()
    await this.file.flush()
    this.old = null
    // Unlink while still open: a closed partial would look abandoned to a concurrent create.
    await unlink(old.path)
    await old.close()
    this.partialPath = this.file.path
  }

  private async writeEnd(device: DeviceState, info: FinishInfo, compacted: boolean): Promise<ImageSummary> {
    const f = this.file
    const map = this.map!
    const runs = map.toRuns()
    const counters = info.counters
    let compat = BigInt(info.compatibleFeatures ?? 0)
    if (counters.xbzrlePages > 0) compat |= COMPAT_XBZRLE_SOURCE
    const streamInfo: T.StreamInfo = {
      v: 1, ramSectionId: device.ramSectionId, ramInstanceId: device.ramInstanceId, ramVersion: device.ramVersion,
      switchoverStart: device.switchoverStart, ramEnd: device.ramEnd, source: info.source,
      libvirtHeader: info.libvirtHeader, creator: CREATOR, counters: { ...counters }, machine: device.machine,
    }
    const records: T.TrailerRecord[] = [
      { type: T.REC_STREAM_INFO, body: T.encodeStreamInfo(streamInfo) },
      { type: T.REC_BLOCK_TABLE, body: T.encodeBlockTable(this.blocks) },
      { type: T.REC_PAGE_MAP, body: T.encodePageMap(runs) },
      { type: T.REC_CONFIG, body: device.config },
      { type: T.REC_DEVICE_SECTIONS, body: device.deviceSections },
      { type: T.REC_STREAM_END, body: device.streamEnd },
      { type: T.REC_CLUSTER_DIRECTORY, body: T.encodeClusterDirectory(f.offsets) },
    ]
    const trailerOffset = f.dataEnd
    // Record 8 goes last, so that base_image_offset is where the records before it end.
    const baseImageOffset = this.base ? trailerOffset + roundUp(T.trailerSize(records), 8) : 0
    if (this.base) records.push({ type: T.REC_BASE_IMAGE, body: encodeBaseImage(this.base.ref) })
    const trailer = T.encodeTrailer(records)
    const fileLength = roundUp(trailerOffset + trailer.length + FOOTER_SIZE, ALIGN)
    const trailerCrc = crc32(trailer)
    const footer = encodeFooter({
      uuid: this.uuid, trailerOffset, trailerLength: trailer.length, trailerCrc,
      clusterCount: f.offsets.length, generation: 1,
    })
    const header = encodeHeader({
      version: 1, headerLength: HEADER_LENGTH_V1,
      incompatibleFeatures: (this.base ? INCOMPAT_BASE_IMAGE : 0n) | (f.frameCounts.some((n) => n > 0) ? INCOMPAT_FRAMED : 0n) | (runs.some((r) => r.shared) ? INCOMPAT_SHARED_SLOTS : 0n),
      compatibleFeatures: compat, autoclearFeatures: 0n,
      clusterSize: this.clusterSize, pageSize: PAGE_SIZE, uuid: this.uuid, creationTime: this.createdAt, generation: 1,
      trailerOffset, trailerLength: trailer.length, fileLength, machine: device.machine, baseImageOffset, encryptionMethod: 0,
    })
    const pad = Buffer.alloc(fileLength - FOOTER_SIZE - trailerOffset - trailer.length)
    await f.writeEnd([trailer, pad, footer], trailerOffset)
    // The header goes last: until it is written the file reads as incomplete.
    if (this.sync) await f.datasync()
    await f.writeEnd([header], 0)
    if (this.sync) await f.datasync()
    // Renamed while still open, so that the partial is held (locked) until it has its name.
    await this.publish(fileLength)
    await f.close()
    const { pages, zeroPages, storedPages, basePages, sharedPages } = map.totals()
    const summary: ImageSummary = {
      path: this.path, uuid: this.uuid.toString('hex'), clusters: f.offsets.length, fileBytes: fileLength,
      storedBytes: f.storedLengths.reduce((a, b) => a + b, 0), rawBytes: f.pageCounts.reduce((a, b) => a + b, 0) * PAGE_SIZE,
      deadBytes: map.deadBytes(f.pageCounts, f.storedLengths), pages, zeroPages, storedPages, basePages, sharedPages,
      ramPages: this.blocks.reduce((n, b) => n + b.size / b.pageSize, 0), ramBytes: this.blocks.reduce((n, b) => n + b.size, 0),
      compacted, indexPath: this.sink?.indexDir ?? localIndexPath(this.path),
    }
    try {
      // From what we hold in memory: the image need not be read back.
      await (await indexModule).PageIndex.buildFrom({
        imagePath: this.path, indexDir: this.sink?.indexDir, pageSize: PAGE_SIZE, blocks: this.blocks, runs,
        clusters: f.offsets.map((offset, seq) => ({ seq, offset, storedLength: f.storedLengths[seq], codec: f.codecs[seq], pageCount: f.pageCounts[seq] })),
        stamp: { uuid: this.uuid, generation: 1, fileLength, trailerCrc, runs: runs.length, clusters: f.offsets.length, blocks: this.blocks.length },
      })
    } catch (e) {
      // The image is complete and valid; a missing index is rebuilt by the next command.
      summary.indexError = e instanceof Error ? e.message : String(e)
    }
    return summary
  }

  /** Rename the partial file to its name, refusing an existing image unless forced; or upload the rest. */
  private async publish(length: number): Promise<void> {
    if (this.sink) {
      await this.sink.publish(length)
      this.partialPath = ''
      return
    }
    await renameIntoPlace(this.partialPath, this.path, this.force)
    this.partialPath = ''
    if (this.sync) fsyncDir(dirname(this.path))
  }

  async abort(): Promise<void> {
    if (this.state === 'aborted' || this.state === 'done') return
    this.state = 'aborted'
    for (const f of [this.old, this.file]) {
      if (!f) continue
      await f.settle()
      await f.close().catch(() => {})
      if (this.partialPath) await unlink(f.path).catch(() => {})
    }
    this.old = null
    this.partialPath = ''
    await this.sink?.abort()
  }
}

/** WriterOptions.threads: a whole number from 1 (default 1). */
function threadCount(n: number | undefined): number {
  if (n === undefined) return 1
  if (!Number.isInteger(n) || n < 1) throw new SnapError('SNAP_USAGE', `threads ${n}: a whole number from 1`)
  return n
}

function describeBlocks(blocks: RamBlockDecl[]): string {
  return blocks.map((b) => `${b.name} (${b.size} bytes)`).join(', ')
}

async function exists(path: string): Promise<boolean> {
  try {
    await lstat(path)
    return true
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false
    throw fromSystemError(e, `checking ${path}`)
  }
}
