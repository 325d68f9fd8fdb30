// An image in object storage (`s3://BUCKET/KEY`) behind the byte-source seam (byte-source.ts):
// ranged GETs of 1 MiB blocks of the object, fetched in parallel, the first one unconditional and
// every later one pinned to its ETag with If-Match, so that a replaced object fails with
// SNAP_OBJECT_CHANGED and never yields bytes from two versions. ImageReader checks everything above
// this exactly as for a local file. Blocks already in the host's cache directory are read from
// their files straight into the reader's buffer, as a local image is. Every GET after the first is done by one fetch thread
// (s3-sync-worker.ts), which also keeps the shared block cache: the reading thread never holds a
// block's claim, and readSync (lazy restore answers page requests on its own thread) waits for
// the fetch thread while read-ahead goes on there. What a reader waits for starts at once, beside
// the read-ahead; then the blocks after a page request, the working set (prefetch()), and the
// blocks ahead of a reader in file order.
import { createHash } from 'node:crypto'
import { mkdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { MessageChannel, Worker, receiveMessageOnPort, type MessagePort } from 'node:worker_threads'
import { SnapError } from '../errors.js'
import { objectCache, parseS3Url, type S3Location } from '../s3/url.js'
import type { ByteSource } from './byte-source.js'
import { BlockCache, DEFAULT_CACHE_MAX } from './s3-cache.js'
import type { FetchJob, FetchReply, FetchRequest, FetchWorkerData } from './s3-sync-worker.js'

export const BLOCK = 1 << 20
/** blocks kept in memory (the header, footer and trailer, chunk boundaries, read-ahead) */
const MEM_BLOCKS = 64
/** ranged GETs in flight at once */
const PARALLEL = 8
const SYNC_TIMEOUT_MS = 10 * 60_000
/** blocks fetched ahead of a reader that reads in file order (eager restore, verify) */
const AHEAD = 24
/** blocks fetched after the one a page request needed (lazy restore), ahead of everything but requests */
const LAZY_AHEAD = 4
/** reads up to this size that miss memory are fetched exactly, not as their whole block */
const SMALL = 64 * 1024

const FETCH_THREAD = new URL('./s3-sync-worker.js', import.meta.url)
let early: Worker | undefined

/**
 * Start the fetch thread now, for the first S3Source opened later: it loads the AWS SDK (0.1-0.2 s
 * of CPU before the HEAD can go out) while the command's own modules load (bin/run.js, for `load`
 * of an s3:// image: a restore from a warm cache waits for nothing else).
 */
export function startFetchThread(): void {
  if (early) return
  const w = new Worker(FETCH_THREAD)
  w.unref()
  w.on('error', () => {}) // one that fails before it is taken is not taken
  w.once('exit', () => {
    if (early === w) early = undefined
  })
  early = w
}

export interface S3SourceOptions {
  /** where the page index and fetched blocks live (defaultCacheDir()) */
  cacheDir?: string
  /** bound of the cache of fetched blocks, bytes (default DEFAULT_CACHE_MAX; 0: no block cache) */
  cacheMax?: number
}

/** The host's cache of object-storage images: --cache-dir (setObjectCache), else $SNAPCTL_CACHE_DIR, else $TMPDIR/snapctl-UID. */
export function defaultCacheDir(): string {
  return objectCache().dir || process.env.SNAPCTL_CACHE_DIR || join(tmpdir(), `snapctl-${process.getuid?.() ?? 'user'}`)
}

/** An object's name in the cache: the endpoint, bucket and key, hashed. */
export function objectId(loc: S3Location): string {
  return createHash('sha256').update(`${process.env.AWS_ENDPOINT_URL_S3 ?? process.env.AWS_ENDPOINT_URL ?? ''}\0${loc.bucket}\0${loc.key}`).digest('hex').slice(0, 32)
}

/** Where the page index of an s3:// image lives on this host (format-spec/index.md): in the cache. */
export function s3IndexPath(loc: S3Location, cacheDir = defaultCacheDir()): string {
  return join(cacheDir, 'index', `${objectId(loc)}.index`)
}

/** --cache-max, else $SNAPCTL_CACHE_MAX (bytes), else DEFAULT_CACHE_MAX. */
export function cacheMaxFromEnv(): number {
  const set = objectCache().max
  if (set !== undefined) return set
  const v = process.env.SNAPCTL_CACHE_MAX
  return v !== undefined && v !== '' && Number.isSafeInteger(Number(v)) && Number(v) >= 0 ? Number(v) : DEFAULT_CACHE_MAX
}

/** A range handed to the fetch thread, until its answer is taken. */
interface Job {
  id: number
  block: number
  lane: 0 | 1 | 2 | 3
  promise: Promise<Buffer>
  resolve: (b: Buffer) => void
  reject: (e: unknown) => void
  settled: boolean
  /** the answer, once settled (for a reader waiting on its own thread) */
  buf?: Buffer
  err?: unknown
  /** what a HEAD or the first GET said about the object */
  etag?: string
  total?: number
}

export class S3Source implements ByteSource {
  readonly path: string
  readonly indexPath: string
  private readonly mem = new Map<number, Buffer>()
  /** blocks being looked up in the cache directory */
  private readonly looking = new Map<number, Promise<Buffer>>()
  /** pinned by open() */
  private etag = ''
  private length = 0
  /** blocks handed to the fetch thread and not answered yet */
  private readonly pending = new Map<number, Job>()
  private readonly jobs = new Map<number, Job>()
  private nextId = 1
  private worker: Worker | undefined
  private port: MessagePort | undefined
  private readonly signal = new Int32Array(new SharedArrayBuffer(4))
  private cache: BlockCache | null = null
  /**
   * blocks known to be in the cache directory (listed at open, or stored by the fetch thread):
   * read straight from their files into the reader's buffer; another process may have evicted
   * one since (then it is fetched again)
   */
  private readonly present = new Set<number>()
  /** the last block the last read touched (read-ahead follows readers in file order) */
  private lastBlock = -1

  private constructor(readonly loc: S3Location, private readonly cacheDir: string) {
    this.path = loc.url
    mkdirSync(join(cacheDir, 'index'), { recursive: true, mode: 0o700 })
    this.indexPath = s3IndexPath(loc, cacheDir)
  }

  /**
   * The object's size and the ETag every later read is pinned to: with the block cache, from a
   * HEAD (block 0 may be cached); without, from the first block, fetched unconditionally. Both
   * by the fetch thread, which loads the AWS SDK: this thread never does.
   */
  static async open(url: string, opts: S3SourceOptions = {}): Promise<S3Source> {
    const loc = parseS3Url(url)
    const cacheDir = opts.cacheDir ?? defaultCacheDir()
    const cacheMax = opts.cacheMax ?? cacheMaxFromEnv()
    const src = new S3Source(loc, cacheDir)
    try {
      const first = await src.ask(cacheMax > 0 ? 'head' : 'first')
      src.etag = first.etag!
      src.length = first.total!
      if (cacheMax > 0) {
        const cache = new BlockCache(cacheDir, objectId(loc), src.etag, cacheMax)
        src.cache = await cache.init().then(() => cache, () => null) // an unwritable cache directory: read without one
        for (const i of (await src.cache?.listed()) ?? []) src.present.add(i)
      } else if (first.buf!.length > 0) src.remember(0, first.buf!)
      src.worker!.postMessage({ op: 'pin', etag: src.etag, cache: src.cache ? { dir: cacheDir, object: objectId(loc), max: cacheMax } : null } satisfies FetchRequest)
      return src
    } catch (e) {
      await src.close()
      throw e
    }
  }

  /** A HEAD, or the first block unpinned: the answer with what the object said about itself. */
  private async ask(op: 'head' | 'first'): Promise<Job> {
    const job = this.submit(0, 0, -1, 0, op)
    await job.promise
    return job
  }

  async size(): Promise<number> {
    return this.length
  }

  private blockLength(i: number): number {
    return Math.min(BLOCK, this.length - i * BLOCK)
  }

  private get lastBlockOfObject(): number {
    return Math.ceil(this.length / BLOCK) - 1
  }

  private remember(i: number, buf: Buffer): void {
    this.mem.delete(i)
    this.mem.set(i, buf)
    while (this.mem.size > MEM_BLOCKS) this.mem.delete(this.mem.keys().next().value as number)
  }

  /** The fetch thread (s3-sync-worker.ts): the one startFetchThread() started, else a new one. */
  private thread(): Worker {
    if (this.worker) return this.worker
    const { port1, port2 } = new MessageChannel()
    const data: FetchWorkerData = { loc: this.loc, port: port2, signal: this.signal.buffer as SharedArrayBuffer, parallel: PARALLEL }
    if (early) {
      this.worker = early
      early = undefined
      this.worker.postMessage({ op: 'init', data } satisfies FetchRequest, [port2])
    } else {
      this.worker = new Worker(FETCH_THREAD, { workerData: data, transferList: [port2] })
      this.worker.unref()
    }
    this.worker.on('error', (e) => this.failAll(new SnapError('SNAP_OBJECT_UNAVAILABLE', `${this.path}: the fetch thread failed: ${e.message}`)))
    port1.on('message', (m: FetchReply) => this.settle(m))
    port1.unref()
    this.port = port1
    return this.worker
  }

  private failAll(e: unknown): void {
    for (const j of this.jobs.values()) this.finish(j, undefined, e)
  }

  /** Hand [start, end) to the fetch thread (block >= 0: block `block`, remembered once it comes). */
  private submit(start: number, end: number, block: number, lane: Job['lane'], op: 'get' | 'head' | 'first' = 'get'): Job {
    let resolve!: (b: Buffer) => void
    let reject!: (e: unknown) => void
    const promise = new Promise<Buffer>((res, rej) => {
      resolve = res
      reject = rej
    })
    promise.catch(() => {}) // read-ahead nobody asks for: its error surfaces when someone does
    const job: Job = { id: this.nextId++, block, lane, promise, resolve, reject, settled: false }
    const thread = this.thread()
    if (this.jobs.size === 0) this.port!.ref() // an answer is awaited: the process stays up for it
    this.jobs.set(job.id, job)
    if (block >= 0) this.pending.set(block, job)
    thread.postMessage(op === 'get' ? ({ op, id: job.id, start, end, block, lane } satisfies FetchJob) : ({ op, id: job.id } satisfies FetchRequest))
    return job
  }

  private settle(m: FetchReply): void {
    const job = this.jobs.get(m.id)
    if (!job) return
    if ('buf' in m) {
      const buf = Buffer.from(m.buf.buffer, m.buf.byteOffset, m.buf.length)
      job.etag = m.etag
      job.total = m.total
      if (job.block >= 0) {
        this.remember(job.block, buf)
        if (this.cache) this.present.add(job.block)
      }
      this.finish(job, buf)
    } else {
      this.finish(job, undefined, m.error ? new SnapError(m.error.code, m.error.message, m.error.context) : new SnapError('SNAP_INTERNAL', `${this.path}: a read-ahead was dropped`))
    }
  }

  private finish(job: Job, buf: Buffer | undefined, err?: unknown): void {
    if (job.settled) return
    job.settled = true
    job.buf = buf
    job.err = err
    this.jobs.delete(job.id)
    if (this.jobs.size === 0) this.port?.unref()
    if (job.block >= 0 && this.pending.get(job.block) === job) this.pending.delete(job.block)
    if (buf) job.resolve(buf)
    else job.reject(err)
  }

  /** Job `job`'s bytes on this thread: answers taken from the port while it waits (the event loop is not running). */
  private waitSync(job: Job): Buffer {
    if (job.lane !== 0) this.worker!.postMessage({ op: 'urgent', id: job.id }) // it jumps the read-ahead
    const until = Date.now() + SYNC_TIMEOUT_MS
    while (!job.settled) {
      const seen = Atomics.load(this.signal, 0)
      for (let m = receiveMessageOnPort(this.port!); m; m = receiveMessageOnPort(this.port!)) this.settle(m.message as FetchReply)
      if (job.settled) break
      if (Date.now() > until) throw new SnapError('SNAP_OBJECT_UNAVAILABLE', `${this.path}: a ranged GET took longer than ${SYNC_TIMEOUT_MS / 1000} s`)
      Atomics.wait(this.signal, 0, seen, 1000)
    }
    if (!job.buf) throw job.err
    return job.buf
  }

  /** Block i, from memory, a fetch under way, the cache directory, or the fetch thread (one fetch however many ask at once). */
  private block(i: number, lane: Job['lane']): Promise<Buffer> {
    const have = this.mem.get(i)
    if (have) {
      this.remember(i, have)
      return Promise.resolve(have)
    }
    const p = this.pending.get(i)?.promise ?? this.looking.get(i)
    if (p) return p
    const fetch = (): Promise<Buffer> => (this.pending.get(i) ?? this.submit(i * BLOCK, i * BLOCK + this.blockLength(i), i, lane)).promise
    // Not listed: the fetch thread looks in the cache itself (another process may have stored it since).
    if (!this.cache || !this.present.has(i)) return fetch()
    // Looked up here first: a host restoring an image again need not start the fetch thread's GETs.
    const look = this.cache.get(i, this.blockLength(i)).then((buf) => {
      this.looking.delete(i)
      if (!buf) {
        this.present.delete(i)
        return fetch() // or readSync queued it meanwhile
      }
      this.remember(i, buf)
      return buf
    })
    this.looking.set(i, look)
    return look
  }

  private range(pos: number, len: number): [number, number] {
    if (pos < 0 || len < 0 || pos + len > this.length) {
      throw new SnapError('SNAP_TRUNCATED', `the image ends at ${this.length}, before ${pos + len}`, { offset: Math.min(pos, this.length) })
    }
    return [Math.floor(pos / BLOCK), Math.floor((pos + len - 1) / BLOCK)]
  }

  /** The bytes of [pos, pos+len) from its blocks: a view of one block, or copied into `into` (or a new buffer). */
  private assemble(pos: number, len: number, first: number, blocks: Buffer[], into?: Buffer): Buffer {
    const off = pos - first * BLOCK
    if (blocks.length === 1) return blocks[0].subarray(off, off + len)
    // Only the bytes asked for, into the reader's buffer where it gave one: concatenating whole
    // blocks per read cost more garbage collection than the rest of a restore from the cache.
    const out = into && into.length >= len ? into.subarray(0, len) : Buffer.allocUnsafe(len)
    let done = 0
    for (let k = 0; k < blocks.length && done < len; k++) {
      const from = k === 0 ? off : 0
      done += blocks[k].copy(out, done, from, Math.min(blocks[k].length, from + len - done))
    }
    return out
  }

  async read(pos: number, len: number, into?: Buffer): Promise<Buffer> {
    if (len === 0) return Buffer.alloc(0)
    const [a, b] = this.range(pos, len)
    // A small read (a cluster header for the index or info) by itself: fetching its whole block
    // would fetch the whole image twice when the index is built before a restore.
    if (!this.cache && len <= SMALL && a === b && !this.mem.has(a) && !this.pending.has(a) && !this.looking.has(a)) return this.submit(pos, pos + len, -1, 0).promise
    if (this.cache && !(a === b && this.mem.has(a))) {
      const out = into && into.length >= len ? into.subarray(0, len) : Buffer.allocUnsafe(len)
      if (await this.fromFiles(pos, len, a, b, out)) {
        this.readAhead(a, b)
        return out
      }
    }
    const parts: Array<Promise<Buffer>> = []
    for (let i = a; i <= b; i++) parts.push(this.block(i, 0))
    this.readAhead(a, b)
    return this.assemble(pos, len, a, await Promise.all(parts), into)
  }

  /**
   * [pos, pos+len) into `out` when every block of it is in memory or in the cache directory: the
   * cached ones read from their files into their place in `out`, as a local image is read (a
   * restore from a warm cache: no buffer per block, no copy, no garbage). False when a block is
   * neither (or was evicted meanwhile): the caller goes through block().
   */
  private async fromFiles(pos: number, len: number, a: number, b: number, out: Buffer): Promise<boolean> {
    for (let i = a; i <= b; i++) if (!this.mem.has(i) && !(this.present.has(i) && !this.pending.has(i) && !this.looking.has(i))) return false
    const reads: Array<Promise<boolean>> = []
    for (let i = a; i <= b; i++) {
      const from = Math.max(pos, i * BLOCK)
      const to = Math.min(pos + len, i * BLOCK + this.blockLength(i))
      const dst = out.subarray(from - pos, to - pos)
      const held = this.mem.get(i)
      if (held) held.copy(dst, 0, from - i * BLOCK, to - i * BLOCK)
      // A block counts as used once, by the read that starts it (chunks share their edge blocks).
      else reads.push(this.cache!.readInto(i, from - i * BLOCK, dst, from === i * BLOCK).then((ok) => ok || !this.present.delete(i)))
    }
    return (await Promise.all(reads)).every(Boolean)
  }

  /**
   * A reader going through the file in order gets the next AHEAD blocks fetched before it asks
   * (in parallel, PARALLEL at a time); errors surface when it does ask.
   */
  private readAhead(a: number, b: number): void {
    // Not from the first read (the header): a lazy restore reads the footer and trailer next, and
    // then only what is asked for and pushed.
    const sequential = this.lastBlock >= 0 && a >= this.lastBlock && a <= this.lastBlock + 1
    this.lastBlock = b
    if (sequential) this.ahead(b + 1, b + AHEAD, 3)
  }

  /** Blocks from..to (clipped to the object) not held or under way, queued on `lane`. */
  private ahead(from: number, to: number, lane: Job['lane']): void {
    for (let i = from; i <= Math.min(to, this.lastBlockOfObject); i++) {
      if (!this.mem.has(i) && !this.present.has(i) && !this.pending.has(i) && !this.looking.has(i)) this.block(i, lane).catch(() => {})
    }
  }

  /**
   * Ranges a reader will want soon, most wanted first (a lazy restore's working set): their
   * blocks are queued in that order, behind the blocks after a page request, ahead of the file
   * order. Without a block cache only as many as memory keeps (more would be fetched twice).
   */
  prefetch(ranges: ReadonlyArray<readonly [number, number]>): void {
    const want: number[] = []
    const seen = new Set<number>()
    for (const [pos, len] of ranges) {
      if (len <= 0 || pos < 0 || pos + len > this.length) continue
      for (let i = Math.floor(pos / BLOCK); i <= Math.floor((pos + len - 1) / BLOCK); i++) {
        if (!seen.has(i)) want.push(i)
        seen.add(i)
      }
    }
    for (const i of this.cache ? want : want.slice(0, MEM_BLOCKS / 2)) this.ahead(i, i, 2)
  }

  /**
   * Lazy restore's page requests, on this thread: from memory, the cache directory, or the fetch
   * thread while this one waits (a block already queued as read-ahead jumps the queue). The
   * blocks that follow are queued next (LAZY_AHEAD), ahead of the working set and the file order.
   */
  readSync(pos: number, len: number): Buffer {
    if (len === 0) return Buffer.alloc(0)
    const [a, b] = this.range(pos, len)
    const blocks: Buffer[] = []
    for (let i = a; i <= b; i++) {
      let buf = this.mem.get(i)
      if (!buf && !this.pending.has(i) && this.cache) {
        // (a lookup under way in `looking` is not waited for: this thread cannot; the file is read again)
        buf = this.cache.getSync(i, this.blockLength(i)) ?? undefined
      }
      buf ??= this.waitSync(this.pending.get(i) ?? this.submit(i * BLOCK, i * BLOCK + this.blockLength(i), i, 0))
      this.remember(i, buf)
      blocks.push(buf)
    }
    this.ahead(b + 1, b + LAZY_AHEAD, 1)
    return this.assemble(pos, len, a, blocks)
  }

  async close(): Promise<void> {
    // Read-ahead nobody asked for yet is dropped; what is under way lands in the cache first, so
    // the bound holds when the last process lets go.
    this.worker?.postMessage({ op: 'drop' })
    await Promise.allSettled([...this.jobs.values()].map((j) => j.promise))
    this.mem.clear()
    await this.cache?.evict()
    this.port?.close()
    await this.worker?.terminate()
    this.worker = undefined
  }
}

