// The LevelDB page index beside an image: format-spec/index.md. A cache of the page map and
// the cluster directory; missing, stale or unreadable indexes are deleted and rebuilt.
import { chmod, mkdir, readFile, readdir, rename, rm, stat, writeFile } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import { join } from 'node:path'
import { Level } from 'level'
import { SnapError, isSnapError } from '../errors.js'
import { PAGE_BASE, PAGE_DATA, PAGE_NEVER_SENT, PAGE_ZERO, type RamBlock } from '../types.js'
import type { DecodedCluster, ImageReader } from '../container/reader.js'
import { BASE_CLUSTER, ZERO_CLUSTER, sameRun, slotServes, type PageLocation, type PageRun } from '../container/locator.js'
import * as K from './keys.js'
import { localIndexPath } from '../container/byte-source.js'
import { pidAlive } from '../container/lock.js'

type DB = Level<Buffer, Buffer>
const BATCH = 4096
const CLUSTER_CACHE = 8
/** LevelDB lets one process at a time open a database: wait this long for another to let go. */
const LOCK_WAIT_MS = 2000
/** How long a rebuild waits for another process's rebuild of the same index (a 4 GiB image's takes ~2 s). */
const BUILD_WAIT_MS = 60_000
let builds = 0

export interface IndexCluster {
  seq: number
  offset: number
  storedLength: number
  codec: number
  pageCount: number
}

/** What an index is built from: an open image (sourceOf) or the writer that just made it. */
export interface IndexSource {
  imagePath: string
  /** where the index goes when not beside a local image (the byte source's indexPath) */
  indexDir?: string
  pageSize: number
  blocks: RamBlock[]
  runs: PageRun[]
  clusters: IndexCluster[]
  stamp: K.IndexMeta
}

/** Why there is no usable index: none, another image's or generation's, damaged, or in a place we cannot write. */
export type IndexUnusable = 'missing' | 'stale' | 'unreadable' | 'inaccessible'

const NO_WRITE = /permission denied|read-only file system|EACCES|EROFS/i

export interface OpenOptions {
  log?: (msg: string) => void
  /** false: report a stale or unreadable index (verify) instead of rebuilding it */
  rebuild?: boolean
}

function openDb(dir: string, create: boolean): DB {
  return new Level<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer', createIfMissing: create })
}

function isLocked(e: unknown): boolean {
  const err = e as { code?: string; cause?: { code?: string } }
  return err?.code === 'LEVEL_LOCKED' || err?.cause?.code === 'LEVEL_LOCKED'
}

function levelError(e: unknown, what: string): SnapError {
  if (isSnapError(e)) return e
  return new SnapError('SNAP_INDEX_CORRUPT', `the page index could not be read (${what}: ${(e as Error)?.message})`, { cause: e })
}

/**
 * One rebuild of an index at a time: `DIR.building`, a directory made atomically, names the
 * builder's PID. Two restores that found the index missing used to build it at once, and the
 * second's rename moved the first's index away while the first had it open: LevelDB goes on
 * writing by path, into the other's directory, and left an index `verify` calls bad. A lock left
 * by a dead process is taken over. Where no lock can be made (a read-only directory) `fn` runs
 * without one and fails as the build would have.
 */
async function withBuildLock<T>(dir: string, fn: () => Promise<T>): Promise<T> {
  const lock = `${dir}.building`
  const deadline = Date.now() + BUILD_WAIT_MS
  for (;;) {
    try {
      await mkdir(lock, { mode: 0o700 })
      break
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') return fn()
      const pid = Number.parseInt(await readFile(join(lock, 'pid'), 'utf8').catch(() => ''), 10)
      if (pid > 0 && !pidAlive(pid)) {
        await rm(lock, { recursive: true, force: true })
        continue
      }
      if (Date.now() > deadline) throw new SnapError('SNAP_LOCKED', `the page index ${dir} is being rebuilt by another process (${lock})`)
      await sleep(25 + Math.random() * 50)
    }
  }
  try {
    await writeFile(join(lock, 'pid'), String(process.pid))
    return await fn()
  } finally {
    await rm(lock, { recursive: true, force: true })
  }
}

async function withUmask<T>(fn: () => Promise<T>): Promise<T> {
  // LevelDB creates its files with the process umask; guest RAM metadata stays private.
  const old = process.umask(0o077)
  try {
    return await fn()
  } finally {
    process.umask(old)
  }
}

export class PageIndex {
  private names = new Map<string, number>()
  private cache = new Map<number, Promise<DecodedCluster>>()

  private constructor(private readonly db: DB, private readonly reader: ImageReader, readonly path: string) {}

  /** A local image's index (the byte source decides where an index lives: see ByteSource.indexPath). */
  static indexPath(imagePath: string): string {
    return localIndexPath(imagePath)
  }

  /**
   * Build the index in a directory of its own and rename it into place, so that a concurrent
   * reader or builder never opens a half-written index at IMAGE.index (two builders: the
   * last rename wins, and both indexes are equally good).
   */
  static async build(reader: ImageReader): Promise<void> {
    await PageIndex.buildFrom(await PageIndex.sourceOf(reader))
  }

  static async sourceOf(reader: ImageReader): Promise<IndexSource> {
    return {
      imagePath: reader.path, indexDir: reader.source.indexPath ?? undefined, pageSize: reader.header.pageSize, blocks: reader.blocks, runs: reader.runs,
      clusters: await reader.clusterInfos(), stamp: PageIndex.stamp(reader),
    }
  }

  static async buildFrom(src: IndexSource): Promise<void> {
    const dir = src.indexDir ?? PageIndex.indexPath(src.imagePath)
    const tmp = `${dir}.tmp-${process.pid}-${++builds}`
    try {
      await withUmask(async () => {
        await mkdir(tmp, { mode: 0o700 })
        const db = openDb(tmp, true)
        await db.open()
        try {
          // Puts are synchronous; only full batches are awaited.
          let batch = db.batch()
          const flush = async (): Promise<void> => {
            await batch.write()
            batch = db.batch()
          }
          const ps = src.pageSize
          for (const b of src.blocks) batch.put(K.nameKey(b.name), K.encodeNameValue(b.id))
          for (const r of src.runs) {
            batch.put(...K.runEntry(r, ps))
            if (batch.length >= BATCH) await flush()
          }
          for (const c of src.clusters) {
            batch.put(K.clusterKey(c.seq), K.encodeClusterValue(c))
            if (batch.length >= BATCH) await flush()
          }
          await flush()
          // Last: an interrupted build leaves no meta key and reads as stale.
          await db.put(K.META_KEY, K.encodeMeta(src.stamp))
        } finally {
          await db.close()
        }
      })
      await chmod(tmp, 0o700)
      for (const f of await readdir(tmp)) await chmod(join(tmp, f), 0o600)
      const old = `${dir}.old-${process.pid}-${builds}`
      await rename(dir, old).catch((e) => {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e
      })
      await rename(tmp, dir).catch((e) => {
        // Another process put its fresh index there between our two renames: keep theirs.
        const code = (e as NodeJS.ErrnoException).code
        if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw e
      })
      await rm(old, { recursive: true, force: true })
    } finally {
      await rm(tmp, { recursive: true, force: true })
    }
  }

  private static stamp(reader: ImageReader): K.IndexMeta {
    return {
      uuid: reader.header.uuid, generation: reader.header.generation, fileLength: reader.fileLength,
      trailerCrc: reader.footer.trailerCrc, runs: reader.runs.length, clusters: reader.clusterOffsets.length, blocks: reader.blocks.length,
    }
  }

  /** Open the index if it is there and fresh; why it cannot be used otherwise. */
  private static async tryOpen(reader: ImageReader): Promise<PageIndex | IndexUnusable> {
    const dir = reader.source.indexPath ?? PageIndex.indexPath(reader.path)
    try {
      await stat(dir)
    } catch {
      return 'missing'
    }
    const db = openDb(dir, false)
    try {
      await withUmask(() => db.open())
    } catch (e) {
      if (isLocked(e)) throw new SnapError('SNAP_LOCKED', `the page index ${dir} is in use by another process`, { cause: e })
      // LevelDB writes (a lock file, a log) even to read: a read-only place is not damage.
      return NO_WRITE.test(String((e as { cause?: unknown })?.cause ?? '') + String((e as Error)?.message)) ? 'inaccessible' : 'unreadable'
    }
    try {
      const raw = await db.get(K.META_KEY)
      const want = PageIndex.stamp(reader)
      const meta = raw ? K.decodeMeta(raw) : null
      if (meta && meta.uuid.equals(want.uuid) && meta.generation === want.generation && meta.fileLength === want.fileLength &&
          meta.trailerCrc === want.trailerCrc && meta.runs === want.runs && meta.clusters === want.clusters) {
        return new PageIndex(db, reader, dir)
      }
      await db.close()
      return 'stale'
    } catch {
      await db.close().catch(() => {})
      return 'unreadable'
    }
  }

  /**
   * The index if it is there and fresh, else why not; writes nothing but what LevelDB writes to
   * open a database. Retried while another process (a load, a build) holds the database's lock.
   */
  static async openExisting(reader: ImageReader): Promise<PageIndex | IndexUnusable> {
    const deadline = Date.now() + LOCK_WAIT_MS
    for (;;) {
      try {
        return await PageIndex.tryOpen(reader)
      } catch (e) {
        if (!isSnapError(e, 'SNAP_LOCKED') || Date.now() > deadline) throw e
        await sleep(25 + Math.random() * 50)
      }
    }
  }

  /**
   * Rebuild the index under the build lock, unless, once the lock is held, it is there and
   * `good` (another process rebuilt it while this one waited). True if this call built it.
   */
  static async rebuildUnlessFresh(reader: ImageReader, good: (index: PageIndex) => Promise<boolean> = async () => true): Promise<boolean> {
    const dir = reader.source.indexPath ?? PageIndex.indexPath(reader.path)
    return withBuildLock(dir, async () => {
      const now = await PageIndex.openExisting(reader).catch(() => null)
      if (now instanceof PageIndex) {
        const ok = await good(now).catch(() => false).finally(() => now.close().catch(() => {}))
        if (ok) return false
      }
      await PageIndex.build(reader)
      return true
    })
  }

  static async open(reader: ImageReader, opts: OpenOptions = {}): Promise<PageIndex> {
    const dir = reader.source.indexPath ?? PageIndex.indexPath(reader.path)
    const first = await PageIndex.openExisting(reader)
    if (first instanceof PageIndex) return first
    if (first !== 'missing' && opts.rebuild === false) {
      const code = first === 'stale' ? 'SNAP_INDEX_MISMATCH' : 'SNAP_INDEX_CORRUPT'
      throw new SnapError(code, `the page index ${dir} is ${first === 'stale' ? 'stale (it describes another image or generation)' : 'unreadable'}; any command that uses it rebuilds it`)
    }
    let built: boolean
    try {
      built = await PageIndex.rebuildUnlessFresh(reader)
    } catch (e) {
      if (isSnapError(e) && e.code !== 'SNAP_IO' && e.code !== 'SNAP_NO_SPACE') throw e
      throw new SnapError('SNAP_INDEX_CORRUPT', `the page index ${dir} was ${first} and could not be rebuilt: ${(e as Error).message}`, { cause: e })
    }
    if (built) opts.log?.(`note: the page index ${dir} was ${first}; rebuilt it from the image`)
    const again = await PageIndex.openExisting(reader)
    if (again instanceof PageIndex) return again
    throw new SnapError('SNAP_INDEX_CORRUPT', `the page index ${dir} is ${again} even after a rebuild`)
  }

  private async resolve(block: number | string): Promise<number> {
    if (typeof block === 'number') return this.reader.blockId(block)
    let id = this.names.get(block)
    if (id === undefined) {
      let v: Buffer | undefined
      try {
        v = await this.db.get(K.nameKey(block))
      } catch (e) {
        throw levelError(e, 'name')
      }
      if (!v) throw new SnapError('SNAP_NO_PAGE', `the image has no RAM block ${JSON.stringify(block)}`)
      id = K.decodeNameValue(v)
      this.reader.blockId(id)
      this.names.set(block, id)
    }
    return id
  }

  /** Where a page is, per the index (the same answer as the image's page locator). */
  async lookup(block: number | string, byteOffset: number): Promise<PageLocation> {
    const id = await this.resolve(block)
    const b = this.reader.blocks[id]
    if (!Number.isSafeInteger(byteOffset) || byteOffset < 0 || byteOffset >= b.size) {
      throw new SnapError('SNAP_NO_PAGE', `offset ${byteOffset} is outside RAM block ${b.name} (${b.size} bytes)`)
    }
    const page = Math.floor(byteOffset / b.pageSize)
    let hit: Array<[Buffer, Buffer]>
    try {
      hit = await this.db.iterator({ ...K.blockRunsUpTo(id, page * b.pageSize), reverse: true, limit: 1 }).all()
    } catch (e) {
      throw levelError(e, 'run')
    }
    const run = hit.length === 0 ? null : K.runFromEntry(hit[0][0], hit[0][1], b.pageSize)
    if (!run || run.blockId !== id || page >= run.firstPage + run.pageCount) return { state: PAGE_NEVER_SENT }
    if (run.cluster === ZERO_CLUSTER) return { state: PAGE_ZERO }
    if (run.cluster === BASE_CLUSTER) return { state: PAGE_BASE }
    const slot = run.firstSlot + page - run.firstPage
    return run.shared ? { state: PAGE_DATA, cluster: run.cluster, slot, shared: true } : { state: PAGE_DATA, cluster: run.cluster, slot }
  }

  /** A page's bytes (a view into a cached decoded cluster), 'zero', 'base' (ask the base image), or null if never sent. */
  async readPage(block: number | string, byteOffset: number): Promise<Buffer | 'zero' | 'base' | null> {
    const loc = await this.lookup(block, byteOffset)
    if (loc.state === PAGE_NEVER_SENT) return null
    if (loc.state === PAGE_ZERO) return 'zero'
    if (loc.state === PAGE_BASE) return 'base'
    const seq = loc.cluster!
    let p = this.cache.get(seq)
    if (p) {
      this.cache.delete(seq)
    } else {
      p = this.reader.readCluster(seq)
      p.catch(() => this.cache.delete(seq))
    }
    this.cache.set(seq, p)
    if (this.cache.size > CLUSTER_CACHE) this.cache.delete(this.cache.keys().next().value!)
    const c = await p
    const id = await this.resolve(block)
    const ps = this.reader.header.pageSize
    const slot = loc.slot!
    // The index is a cache: never hand out a page the cluster does not name.
    if (!slotServes(c.pages, slot, id, Math.floor(byteOffset / ps), loc.shared === true)) {
      throw new SnapError('SNAP_INDEX_MISMATCH', `the page index points page ${byteOffset} of block ${id} at cluster ${seq} slot ${slot}, which holds another page`, { cluster: seq, offset: c.offset })
    }
    return c.raw.subarray(slot * ps, (slot + 1) * ps)
  }

  async loadAll(): Promise<{ runs: PageRun[]; clusters: IndexCluster[] }> {
    const ps = this.reader.header.pageSize
    try {
      const runs: PageRun[] = []
      for (const [k, v] of await this.db.iterator(K.RUNS_RANGE).all()) runs.push(K.runFromEntry(k, v, ps))
      const clusters: IndexCluster[] = []
      for (const [k, v] of await this.db.iterator(K.CLUSTERS_RANGE).all()) {
        const seq = K.decodeClusterKey(k)
        if (seq !== clusters.length) throw new SnapError('SNAP_INDEX_CORRUPT', `the page index lacks cluster ${clusters.length}`)
        clusters.push({ seq, ...K.decodeClusterValue(v) })
      }
      return { runs, clusters }
    } catch (e) {
      throw levelError(e, 'runs and clusters')
    }
  }

  /**
   * Whether the index's runs are exactly `runs` (the image's page map), read entry by entry:
   * materialising a 4 GiB VM's 280,000 runs cost load ~40 MiB of memory.
   */
  async sameRuns(runs: PageRun[]): Promise<boolean> {
    const ps = this.reader.header.pageSize
    let i = 0
    try {
      for await (const [k, v] of this.db.iterator(K.RUNS_RANGE)) {
        const r = runs[i++]
        if (r === undefined || !sameRun(K.runFromEntry(k, v, ps), r)) return false
      }
    } catch (e) {
      throw levelError(e, 'runs')
    }
    return i === runs.length
  }

  /** Compare every entry with the image; the first difference as SNAP_INDEX_MISMATCH, or null. */
  async check(reader: ImageReader): Promise<SnapError | null> {
    const mismatch = (what: string, details: Record<string, unknown> = {}) =>
      new SnapError('SNAP_INDEX_MISMATCH', `the page index disagrees with the image: ${what}; delete ${this.path} or let any command rebuild it`, details)
    let all: { runs: PageRun[]; clusters: IndexCluster[] }
    let names: Array<[Buffer, Buffer]>
    try {
      all = await this.loadAll()
      names = await this.db.iterator(K.NAMES_RANGE).all()
    } catch (e) {
      return mismatch(`it cannot be read (${(e as Error).message})`)
    }
    const n = Math.max(all.runs.length, reader.runs.length)
    for (let i = 0; i < n; i++) {
      const a = all.runs[i]
      const b = reader.runs[i]
      if (!a || !b || !sameRun(a, b)) {
        return mismatch(`page map run ${i} differs`, { run: i, index: a ?? null, image: b ?? null })
      }
    }
    const infos = await reader.clusterInfos()
    for (let i = 0; i < Math.max(infos.length, all.clusters.length); i++) {
      const a = all.clusters[i]
      const b = infos[i]
      if (!a || !b || a.offset !== b.offset || a.storedLength !== b.storedLength || a.codec !== b.codec || a.pageCount !== b.pageCount) {
        return mismatch(`cluster ${i} differs`, { cluster: i, offset: b?.offset })
      }
    }
    if (names.length !== reader.blocks.length) return mismatch('the block names differ')
    for (const [k, v] of names) {
      const id = K.decodeNameValue(v)
      if (reader.blocks[id]?.name !== K.decodeNameKey(k)) return mismatch(`block name ${K.decodeNameKey(k)} differs`)
    }
    return null
  }

  async close(): Promise<void> {
    this.cache.clear()
    await this.db.close()
  }
}
