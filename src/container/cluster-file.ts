// The file side of the writer: appends data clusters (format-spec/container.md, "Data
// clusters") to a partial image in sequence order, with several in flight. Compression runs
// on the libuv pool; offsets are assigned in order once a cluster's stored size is known, and
// writes overlap. Recently written clusters' raw pages stay in an LRU so that XBZRLE deltas
// against them need no read.
import { closeSync, constants, fsyncSync, openSync } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { crc32 } from './crc.js'
import { roundUp } from '../bytes.js'
import { readFullySync } from './byte-source.js'
import { SnapError, fromSystemError } from '../errors.js'
import { FLAG_FRAMED, clusterExtent, decodePayloadSync, encodeClusterHeader, frameTableCrc, splitCluster, type ClusterHeader, type ClusterLimits } from './cluster.js'
import { ALIGN, HEADER_SIZE } from './header.js'
import { AlignedPool, bypassRefusedNote, openDirect, probeWriteZeros, writeDirect } from './direct-io.js'

export interface Stored {
  codec: number
  stored: Buffer
  /** a framed LZ4 payload (cluster.ts encodeFrames): pages per frame and the frame table */
  framePages?: number
  frames?: Uint32Array
}

const NO_FRAMES = new Uint32Array(0)

const ZEROS = Buffer.alloc(ALIGN)
export const LRU_BYTES = 16 * 1024 * 1024
/** O_DIRECT cluster writes in flight at once (--bypass-cache): each holds one aligned slot. */
const DIRECT_SLOTS = 3

export interface ClusterFileOptions {
  /** bytes of recently written clusters kept decoded (default LRU_BYTES) */
  lruBytes?: number
  /** write with O_DIRECT (direct-io.ts); where the filesystem refuses, `note` says so */
  bypassCache?: boolean
  /**
   * fdatasync on the libuv pool every this many bytes written, while the stream goes on, so
   * that a final fdatasync (--sync) has little left to write back (not with O_DIRECT: the data
   * is on the disk when a write returns)
   */
  syncEvery?: number
}

export async function writeFully(fh: FileHandle, bufs: Buffer[], pos: number): Promise<void> {
  const total = bufs.reduce((n, b) => n + b.length, 0)
  const { bytesWritten } = await fh.writev(bufs, pos)
  // A regular file only writes short when the disk fills up: finish it the slow way to get the error.
  if (bytesWritten < total) {
    const rest = Buffer.concat(bufs).subarray(bytesWritten)
    for (let done = 0; done < rest.length; ) {
      const r = await fh.write(rest, done, rest.length - done, pos + bytesWritten + done)
      if (r.bytesWritten === 0) throw Object.assign(new Error('short write'), { code: 'ENOSPC' })
      done += r.bytesWritten
    }
  }
}

export class ClusterFile {
  readonly offsets: number[] = []
  readonly storedLengths: number[] = []
  readonly pageCounts: number[] = []
  readonly codecs: number[] = []
  readonly frameCounts: number[] = []
  dataEnd = HEADER_SIZE
  inflight = 0
  failure: SnapError | null = null
  private chain: Promise<void> = Promise.resolve()
  private writes = new Set<Promise<void>>()
  private pinned = new Map<number, Buffer>()
  private lru = new Map<number, Buffer>()
  private lruBytes = 0
  private waiters: Array<() => void> = []
  private closed = false
  /** told of every buffer that leaves the cache, so that the writer can reuse it */
  onEvict: ((raw: Buffer) => void) | null = null
  /** told of every stored payload once it is written, so that the writer can reuse its buffer */
  onStoredWritten: ((stored: Buffer) => void) | null = null
  /** with bypassCache: the O_DIRECT handle and its aligned slots, or null (refused, or not asked) */
  private direct: { fh: FileHandle; pool: AlignedPool } | null = null
  /** why bypassCache could not be honoured, for the caller to print */
  note: string | null = null
  private syncedTo = HEADER_SIZE
  /** fdatasyncs started while writing (syncEvery) */
  syncs = 0
  private syncing: Promise<void> | null = null
  private readonly lruLimit: number
  /** told where the clusters written so far, in sequence, end (an upload follows the file: s3-upload.ts) */
  onWritten: ((end: number) => void) | null = null
  private readonly ends: number[] = []
  private done = new Set<number>()
  private nextDone = 0

  private constructor(readonly path: string, readonly fh: FileHandle, readonly lim: ClusterLimits, private readonly opts: ClusterFileOptions) {
    this.lruLimit = opts.lruBytes ?? LRU_BYTES
  }

  /** Create the partial file (O_EXCL, 0600) and write the zero header block. */
  static async create(path: string, lim: ClusterLimits, opts: ClusterFileOptions = {}): Promise<ClusterFile> {
    let fh: FileHandle
    try {
      fh = await open(path, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, 0o600)
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') {
        throw new SnapError('SNAP_LOCKED', `${path} exists: another create of this image is running`, { cause: e })
      }
      throw fromSystemError(e, `creating ${path}`)
    }
    const f = new ClusterFile(path, fh, lim, opts)
    try {
      if (opts.bypassCache) await f.openDirect()
      // With O_DIRECT the probe for an aligned slot has written it.
      if (!f.direct) await writeFully(fh, [Buffer.alloc(HEADER_SIZE)], 0)
    } catch (e) {
      await f.direct?.fh.close().catch(() => {})
      await fh.close().catch(() => {})
      throw fromSystemError(e, `writing ${path}`)
    }
    return f
  }

  private async openDirect(): Promise<void> {
    const dfh = await openDirect(this.path, constants.O_WRONLY)
    if (!dfh) {
      this.note = bypassRefusedNote(this.path)
      return
    }
    // Slots for whole clusters (header blocks + the largest payload); the first is made now,
    // probed by writing the zero header block.
    const slot = clusterExtent(this.lim.maxPages, this.lim.maxPages * this.lim.pageSize, this.lim.framed ? this.lim.maxPages : 0)
    const pool = new AlignedPool(slot, DIRECT_SLOTS, probeWriteZeros(dfh.fd))
    pool.give(pool.takeSync(slot))
    this.direct = { fh: dfh, pool }
  }

  /** Write `bufs` back to back at `pos` (file offsets are multiples of 4096, lengths padded to them with O_DIRECT). */
  private write(bufs: Buffer[], pos: number): Promise<void> {
    return this.direct ? writeDirect(this.direct.fh, this.direct.pool, bufs, pos) : writeFully(this.fh, bufs, pos)
  }

  /**
   * The trailer, footer and header, written as the clusters are (the caller pads them to whole
   * 4096-byte blocks): with O_DIRECT they too stay out of the page cache.
   */
  async writeEnd(bufs: Buffer[], pos: number): Promise<void> {
    await this.write(bufs, pos)
  }

  /** fdatasync: with O_DIRECT, and after the periodic ones, little is left to write back. */
  async datasync(): Promise<void> {
    await this.syncing
    await this.fh.datasync()
  }

  /**
   * Queue cluster `seq` (the next sequence number). `raw` (the decoded pages, when the caller
   * has them) is pinned until written, then cached.
   */
  enqueue(seq: number, pages: Uint32Array, pageCount: number, raw: Buffer | null, stored: Promise<Stored>): void {
    this.inflight++
    this.pageCounts[seq] = pageCount
    if (raw) this.pinned.set(seq, raw)
    stored.catch(() => {})
    this.chain = this.chain
      .then(async () => {
        if (this.failure) return
        const s = await stored
        const frames = s.frames ?? NO_FRAMES
        const header = encodeClusterHeader({
          sequence: seq, codec: s.codec, flags: frames.length ? FLAG_FRAMED : 0, pageCount, rawLength: pageCount * this.lim.pageSize,
          storedLength: s.stored.length, dataCrc: frames.length ? frameTableCrc(frames) : crc32(s.stored), pages,
          framePages: frames.length ? s.framePages! : 0, frames,
        })
        const offset = this.dataEnd
        const pad = roundUp(s.stored.length, ALIGN) - s.stored.length
        this.dataEnd += header.length + s.stored.length + pad
        this.ends[seq] = this.dataEnd
        this.offsets[seq] = offset
        this.storedLengths[seq] = s.stored.length
        this.codecs[seq] = s.codec
        this.frameCounts[seq] = frames.length / 2
        const w = this.write(pad && !this.direct ? [header, s.stored, ZEROS.subarray(0, pad)] : [header, s.stored], offset).then(
          () => {
            this.onStoredWritten?.(s.stored)
            this.written(seq)
          },
          (e) => this.fail(e),
        )
        this.writes.add(w)
        void w.then(() => this.writes.delete(w))
      })
      .catch((e) => this.fail(e))
  }

  private written(seq: number): void {
    this.inflight--
    this.startSync()
    if (this.onWritten) {
      this.done.add(seq)
      let end = -1
      while (this.done.delete(this.nextDone)) end = this.ends[this.nextDone++]
      if (end >= 0) this.onWritten(end)
    }
    const raw = this.pinned.get(seq)
    if (raw) {
      this.pinned.delete(seq)
      this.cache(seq, raw)
    }
    this.wake()
  }

  /** Start an fdatasync on the libuv pool when `syncEvery` bytes were written since the last. */
  private startSync(): void {
    const every = this.opts.syncEvery
    if (!every || this.direct || this.syncing || this.dataEnd - this.syncedTo < every) return
    this.syncedTo = this.dataEnd
    this.syncs++
    this.syncing = this.fh.datasync().then(
      () => void (this.syncing = null),
      (e) => {
        this.syncing = null
        this.fail(e)
      },
    )
  }

  private cache(seq: number, raw: Buffer): void {
    this.lru.set(seq, raw)
    this.lruBytes += raw.length
    for (const [k, v] of this.lru) {
      if (this.lruBytes <= this.lruLimit) break
      this.lru.delete(k)
      this.lruBytes -= v.length
      this.onEvict?.(v)
    }
  }

  private fail(e: unknown): void {
    this.failure ??= fromSystemError(e, `writing ${this.path}`)
    this.wake()
  }

  private wake(): void {
    const w = this.waiters
    this.waiters = []
    for (const f of w) f()
  }

  /** Wait until at most `limit` clusters are in flight; throw an earlier write's error. */
  async waitBelow(limit: number): Promise<void> {
    while (!this.failure && this.inflight > limit) await new Promise<void>((r) => this.waiters.push(r))
    if (this.failure) throw this.failure
  }

  async flush(): Promise<void> {
    await this.chain
    await Promise.all([...this.writes])
    await this.syncing
    if (this.failure) throw this.failure
  }

  /** The decoded pages of a sealed cluster, synchronously: from memory, else read and checked. */
  rawSync(seq: number): Buffer {
    const pinned = this.pinned.get(seq)
    if (pinned) return pinned
    const cached = this.lru.get(seq)
    if (cached) {
      this.lru.delete(seq)
      this.lru.set(seq, cached)
      return cached
    }
    const { header, stored } = this.readSync(seq)
    const raw = decodePayloadSync(header, stored, { cluster: seq, offset: this.offsets[seq] })
    this.cache(seq, raw)
    return raw
  }

  /** Read a written cluster back and check its header (not its payload). */
  readSync(seq: number): { header: ClusterHeader; stored: Buffer } {
    const offset = this.offsets[seq]
    const buf = Buffer.allocUnsafe(clusterExtent(this.pageCounts[seq], this.storedLengths[seq], this.frameCounts[seq]))
    const got = readFullySync(this.fh.fd, buf, offset)
    return splitCluster(buf.subarray(0, got), { cluster: seq, offset }, this.lim)
  }

  cached(seq: number): Buffer | undefined {
    return this.pinned.get(seq) ?? this.lru.get(seq)
  }

  /** Wait for everything queued, ignoring errors (for abort). */
  async settle(): Promise<void> {
    await this.chain.catch(() => {})
    await Promise.allSettled([...this.writes])
    await this.syncing
  }

  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    this.lru.clear()
    this.pinned.clear()
    await this.direct?.fh.close().catch(() => {})
    await this.fh.close()
  }
}

/** fsync a directory so that a rename in it survives a crash. */
export function fsyncDir(dir: string): void {
  let fd = -1
  try {
    fd = openSync(dir, 'r')
    fsyncSync(fd)
  } catch {
    // Some filesystems refuse fsync on a directory; the rename itself has been done.
  } finally {
    if (fd >= 0) closeSync(fd)
  }
}
