// An image in object storage (`s3://BUCKET/KEY`) behind the byte-source seam (byte-source.ts):
// ranged GETs of 1 MiB blocks of the object, fetched in parallel, the first one unconditional and
// every later one pinned to its ETag with If-Match, so that a replaced object fails with
// SNAP_OBJECT_CHANGED and never yields bytes from two versions. ImageReader checks everything above
// this exactly as for a local file. readSync (lazy restore answers page requests on its own
// thread) blocks on a worker thread that does the GET (s3-sync-worker.ts).
import { GetObjectCommand, HeadObjectCommand } from '@aws-sdk/client-s3'
import { createHash } from 'node:crypto'
import { appendFileSync, mkdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Worker } from 'node:worker_threads'
import { SnapError } from '../errors.js'
import { parseS3Url, s3Client, s3Error, withRetry, type S3Location } from '../s3/client.js'
import { objectCache } from '../s3/url.js'
import type { ByteSource } from './byte-source.js'
import { BlockCache, DEFAULT_CACHE_MAX } from './s3-cache.js'

export const BLOCK = 1 << 20
/** blocks kept in memory (the header, footer and trailer, chunk boundaries, read-ahead) */
const MEM_BLOCKS = 64
/** ranged GETs in flight at once */
const PARALLEL = 8
const SYNC_TIMEOUT_MS = 10 * 60_000
/** blocks fetched ahead of a reader that reads in file order (eager restore, verify) */
const AHEAD = 24
/** reads up to this size that miss memory are fetched exactly, not as their whole block */
const SMALL = 64 * 1024

export interface S3SourceOptions {
  /** where the page index and fetched blocks live (defaultCacheDir()) */
  cacheDir?: string
  /** bound of the cache of fetched blocks, bytes (default DEFAULT_CACHE_MAX; 0: no block cache) */
  cacheMax?: number
}

/** A GET's body as one Buffer, and what the object said about itself. */
export async function getRange(loc: S3Location, start: number, end: number, etag: string | undefined): Promise<{ buf: Buffer; etag?: string; total?: number }> {
  // Tests count what is fetched: one line per GET (O_APPEND, so processes can share the file).
  if (process.env.SNAPCTL_S3_GET_LOG) appendFileSync(process.env.SNAPCTL_S3_GET_LOG, `${start}-${end}\n`)
  const r = await s3Client().send(new GetObjectCommand({ Bucket: loc.bucket, Key: loc.key, Range: `bytes=${start}-${end - 1}`, IfMatch: etag }))
  const buf = await collect(r.Body as unknown as AsyncIterable<Uint8Array>, end - start)
  const m = /\/(\d+)$/.exec(r.ContentRange ?? '')
  return { buf, etag: r.ETag, total: m ? Number(m[1]) : r.ContentLength }
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

/**
 * A GET's body into one buffer of the size asked for, copied once as it arrives (the SDK's
 * transformToByteArray concatenates the chunks, and Buffer.from copied that again: garbage
 * collection was the largest cost of a first restore). A longer body is kept whole, for the
 * caller's length check to refuse.
 */
async function collect(body: AsyncIterable<Uint8Array>, expect: number): Promise<Buffer> {
  let out = Buffer.allocUnsafe(expect)
  let n = 0
  for await (const chunk of body) {
    if (n + chunk.length > out.length) out = Buffer.concat([out.subarray(0, n)], Math.max(2 * out.length, n + chunk.length))
    out.set(chunk, n)
    n += chunk.length
  }
  return out.subarray(0, n)
}

export class S3Source implements ByteSource {
  readonly path: string
  readonly indexPath: string
  private readonly mem = new Map<number, Buffer>()
  private readonly inflight = new Map<number, Promise<Buffer>>()
  private active = 0
  private readonly waiting: Array<() => void> = []
  private worker: Worker | undefined
  private cache: BlockCache | null = null
  /** bytes fetched from object storage */
  bytesFetched = 0
  requests = 0
  /** blocks found in the cache directory */
  cacheHits = 0
  /** the last block the last read touched (read-ahead follows readers in file order) */
  private lastBlock = -1

  private constructor(readonly loc: S3Location, readonly etag: string, private readonly length: number, cacheDir: string) {
    this.path = loc.url
    mkdirSync(join(cacheDir, 'index'), { recursive: true, mode: 0o700 })
    this.indexPath = s3IndexPath(loc, cacheDir)
  }

  /**
   * The object's size and the ETag every later read is pinned to: with the block cache, from a
   * HEAD (block 0 may be cached); without, from the first block, fetched unconditionally.
   */
  static async open(url: string, opts: S3SourceOptions = {}): Promise<S3Source> {
    const loc = parseS3Url(url)
    const cacheDir = opts.cacheDir ?? defaultCacheDir()
    const cacheMax = opts.cacheMax ?? cacheMaxFromEnv()
    if (cacheMax > 0) {
      const head = await withRetry(loc, `reading ${url}`, () => s3Client().send(new HeadObjectCommand({ Bucket: loc.bucket, Key: loc.key }))).catch(async (e: unknown) => {
        // A HEAD's 404 has no body to say whether the bucket or the object is missing: a GET does.
        if ((e as SnapError).code === 'SNAP_OBJECT_NOT_FOUND') await withRetry(loc, `reading ${url}`, () => getRange(loc, 0, 1, undefined))
        throw e
      })
      if (!head.ETag || head.ContentLength === undefined) throw new SnapError('SNAP_OBJECT_UNAVAILABLE', `${url}: the store sent no ETag or size for the object`)
      const src = new S3Source(loc, head.ETag, head.ContentLength, cacheDir)
      src.cache = new BlockCache(cacheDir, objectId(loc), head.ETag, cacheMax)
      await src.cache.init().catch(() => {
        src.cache = null // an unwritable cache directory: read without one
      })
      return src
    }
    const first = await withRetry(loc, `reading ${url}`, () => getRange(loc, 0, BLOCK, undefined)).catch((e) => {
      if ((e as SnapError).context?.status === 416) return { buf: Buffer.alloc(0), etag: '""', total: 0 } // an empty object
      throw e
    })
    if (!first.etag || first.total === undefined) throw new SnapError('SNAP_OBJECT_UNAVAILABLE', `${url}: the store sent no ETag or size with a ranged GET`)
    const src = new S3Source(loc, first.etag, first.total, cacheDir)
    src.remember(0, first.buf)
    src.bytesFetched += first.buf.length
    src.requests++
    return src
  }

  async size(): Promise<number> {
    return this.length
  }

  private blockLength(i: number): number {
    return Math.min(BLOCK, this.length - i * BLOCK)
  }

  private remember(i: number, buf: Buffer): void {
    this.mem.delete(i)
    this.mem.set(i, buf)
    while (this.mem.size > MEM_BLOCKS) this.mem.delete(this.mem.keys().next().value as number)
  }

  private async slot(): Promise<void> {
    while (this.active >= PARALLEL) await new Promise<void>((r) => this.waiting.push(r))
    this.active++
  }

  private release(): void {
    this.active--
    this.waiting.shift()?.()
  }

  private checked(i: number, got: { buf: Buffer; etag?: string }): Buffer {
    if (got.etag !== undefined && got.etag !== this.etag) throw new SnapError('SNAP_OBJECT_CHANGED', `${this.path} was replaced while it was being read: its ETag changed`, { offset: i * BLOCK })
    if (got.buf.length !== this.blockLength(i)) throw new SnapError('SNAP_OBJECT_CHANGED', `${this.path}: a ranged GET at ${i * BLOCK} returned ${got.buf.length} bytes, not ${this.blockLength(i)}`, { offset: i * BLOCK })
    return got.buf
  }

  /** Block i, from memory, the cache directory, or one pinned ranged GET (one fetch however many ask at once). */
  private block(i: number): Promise<Buffer> {
    const have = this.mem.get(i)
    if (have) {
      this.remember(i, have)
      return Promise.resolve(have)
    }
    let p = this.inflight.get(i)
    if (p) return p
    p = (async () => {
      try {
        const len = this.blockLength(i)
        const fetch = async (): Promise<Buffer> => {
          await this.slot()
          try {
            const start = i * BLOCK
            const got = await withRetry(this.loc, `reading ${this.path} at ${start}`, () => getRange(this.loc, start, start + len, this.etag))
            return this.fetched(i, got)
          } finally {
            this.release()
          }
        }
        let buf: Buffer
        if (this.cache) {
          const r = await this.cache.obtain(i, len, fetch)
          if (r.hit) this.cacheHits++
          buf = r.buf
        } else buf = await fetch()
        this.remember(i, buf)
        return buf
      } finally {
        this.inflight.delete(i)
      }
    })()
    this.inflight.set(i, p)
    return p
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
    if (!this.cache && len <= SMALL && a === b && !this.mem.has(a) && !this.inflight.has(a)) return this.exact(pos, len)
    const parts: Array<Promise<Buffer>> = []
    for (let i = a; i <= b; i++) parts.push(this.block(i))
    parts.forEach((p) => p.catch(() => {}))
    this.readAhead(a, b)
    return this.assemble(pos, len, a, await Promise.all(parts), into)
  }

  /**
   * A reader going through the file in order gets the next AHEAD blocks fetched before it asks
   * (in parallel, PARALLEL at a time); errors surface when it does ask.
   */
  private readAhead(a: number, b: number): void {
    const sequential = a >= this.lastBlock && a <= this.lastBlock + 1
    this.lastBlock = b
    if (!sequential) return
    const last = Math.min(b + AHEAD, Math.ceil(this.length / BLOCK) - 1)
    for (let i = b + 1; i <= last; i++) {
      if (!this.mem.has(i) && !this.inflight.has(i)) this.block(i).catch(() => {})
    }
  }

  /**
   * A small read (a cluster header for the index or info, the footer) by itself: fetching its
   * whole block would fetch the whole image twice when the index is built before a restore.
   */
  private async exact(pos: number, len: number): Promise<Buffer> {
    await this.slot()
    try {
      const got = await withRetry(this.loc, `reading ${this.path} at ${pos}`, () => getRange(this.loc, pos, pos + len, this.etag))
      if (got.etag !== undefined && got.etag !== this.etag) throw new SnapError('SNAP_OBJECT_CHANGED', `${this.path} was replaced while it was being read: its ETag changed`, { offset: pos })
      if (got.buf.length !== len) throw new SnapError('SNAP_OBJECT_CHANGED', `${this.path}: a ranged GET at ${pos} returned ${got.buf.length} bytes, not ${len}`, { offset: pos })
      this.bytesFetched += len
      this.requests++
      return got.buf
    } finally {
      this.release()
    }
  }

  /** Lazy restore's page requests: from memory, or a GET done by the worker while this thread waits. */
  readSync(pos: number, len: number): Buffer {
    if (len === 0) return Buffer.alloc(0)
    const [a, b] = this.range(pos, len)
    const blocks: Buffer[] = []
    for (let i = a; i <= b; i++) {
      let buf = this.mem.get(i)
      if (!buf && this.cache) buf = this.cachedSync(this.cache, i)
      if (!buf) buf = this.fetched(i, this.fetchSync(i))
      this.remember(i, buf)
      blocks.push(buf)
    }
    return this.assemble(pos, len, a, blocks)
  }

  /** Block i from the cache directory, or fetched by this process (which stores it) or another. */
  private cachedSync(cache: BlockCache, i: number): Buffer {
    const r = cache.obtainSync(i, this.blockLength(i), () => this.fetched(i, this.fetchSync(i)))
    if (r.hit) this.cacheHits++
    return r.buf
  }

  private fetched(i: number, got: { buf: Buffer; etag?: string }): Buffer {
    const buf = this.checked(i, got)
    this.bytesFetched += buf.length
    this.requests++
    return buf
  }

  private fetchSync(i: number): { buf: Buffer; etag?: string } {
    this.worker ??= new Worker(new URL('./s3-sync-worker.js', import.meta.url), { workerData: { loc: this.loc, etag: this.etag } })
    this.worker.unref()
    const len = this.blockLength(i)
    const sab = new SharedArrayBuffer(8 + Math.max(len, 4096))
    const state = new Int32Array(sab, 0, 2)
    this.worker.postMessage({ start: i * BLOCK, end: i * BLOCK + len, sab })
    if (Atomics.wait(state, 0, 0, SYNC_TIMEOUT_MS) === 'timed-out') throw new SnapError('SNAP_OBJECT_UNAVAILABLE', `${this.path}: a ranged GET at ${i * BLOCK} took longer than ${SYNC_TIMEOUT_MS / 1000} s`)
    const n = state[1]
    const bytes = Buffer.from(new Uint8Array(sab, 8, n))
    if (state[0] !== 1) {
      const e = JSON.parse(bytes.toString('utf8')) as { code: SnapError['code']; message: string }
      throw new SnapError(e.code, e.message)
    }
    return { buf: bytes }
  }

  async close(): Promise<void> {
    // Blocks fetched ahead land in the cache first: then the bound holds when the last process lets go.
    await Promise.allSettled([...this.inflight.values()])
    this.mem.clear()
    await this.cache?.evict()
    await this.worker?.terminate()
    this.worker = undefined
  }
}

export { s3Error }
