// The host's cache of blocks fetched from object storage (`--cache-dir`, README "Images in object
// storage"): one file per 1 MiB block, `CACHE/blocks/OBJECT.ETAG.N`, named by the object
// (endpoint, bucket, key), its ETag (a replaced object never meets the old one's blocks) and the
// block number. Shared by every process on the host:
// - a block file appears whole or not at all: written to a private temporary name, then renamed;
//   a reader opens the name, so eviction meanwhile cannot tear what it reads;
// - one process fetches a block at a time: it claims `NAME.lock` (O_EXCL) first; the others wait
//   for the block file (the claim of a process that is gone, or older than CLAIM_STALE_MS, is
//   taken over), so that an object range is fetched once however many restores want it;
// - bounded: after every `max/8` bytes it added, and when it closes, a process lists the cache and
//   deletes the least recently used blocks (hits touch their mtime) until it holds at most `max`.
import { close, closeSync, futimes, open as openFd, openSync, read as readFd, readFileSync, readdirSync, renameSync, statSync, unlinkSync, utimesSync, writeFileSync, writeSync } from 'node:fs'
import { mkdir, open, readFile, readdir, rename, stat, unlink, utimes, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { randomBytes } from 'node:crypto'
import { pidAlive } from './lock.js'

/** the default bound of a cache directory (--cache-max) */
export const DEFAULT_CACHE_MAX = 2 * 1024 ** 3
const CLAIM_STALE_MS = 30_000
const WAIT_MS = 60_000
const POLL_MS = 5
const sleeper = new Int32Array(new SharedArrayBuffer(4))

export class BlockCache {
  readonly dir: string
  private added = 0
  private readonly prefix: string

  /** `object`: objectId(); `etag`: the object's ETag as the store sent it. */
  constructor(cacheDir: string, object: string, etag: string, readonly max: number) {
    this.dir = join(cacheDir, 'blocks')
    this.prefix = `${object}.${Buffer.from(etag.replace(/"/g, '')).toString('hex').slice(0, 48)}.`
  }

  async init(): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 })
  }

  private name(i: number): string {
    return join(this.dir, `${this.prefix}${i}`)
  }

  /** The blocks of this object (this ETag) the directory holds now. */
  async listed(): Promise<Set<number>> {
    const names = await readdir(this.dir).catch(() => [] as string[])
    const out = new Set<number>()
    for (const n of names) if (n.startsWith(this.prefix) && /^\d+$/.test(n.slice(this.prefix.length))) out.add(Number(n.slice(this.prefix.length)))
    return out
  }

  /**
   * Bytes [from, from + into.length) of block i, read from its file straight into `into` (no
   * buffer of the block's own, no copy); `touch`: the read counts as a use. False when the block
   * is not there (evicted) or ends first.
   */
  readInto(i: number, from: number, into: Buffer, touch: boolean): Promise<boolean> {
    return new Promise((res) => {
      openFd(this.name(i), 'r', (err, fd) => {
        if (err) return res(false)
        const done = (ok: boolean) => close(fd, () => res(ok))
        const fill = (got: number): void => {
          if (got === into.length) {
            if (!touch) return done(true)
            const now = new Date()
            return futimes(fd, now, now, () => done(true))
          }
          readFd(fd, into, got, into.length - got, from + got, (e, n) => (e || n === 0 ? done(false) : fill(got + n)))
        }
        fill(0)
      })
    })
  }

  /** Block i if cached with `len` bytes (a hit counts as a use). */
  async get(i: number, len: number): Promise<Buffer | null> {
    const f = this.name(i)
    const buf = await readFile(f).catch(() => null)
    if (!buf || buf.length !== len) return null
    const now = new Date()
    void utimes(f, now, now).catch(() => {})
    return buf
  }

  getSync(i: number, len: number): Buffer | null {
    const f = this.name(i)
    let buf: Buffer
    try {
      buf = readFileSync(f)
    } catch {
      return null
    }
    if (buf.length !== len) return null
    try {
      const now = new Date()
      utimesSync(f, now, now)
    } catch {
      // evicted meanwhile: we read it whole
    }
    return buf
  }

  /** True when this process may fetch block i; false: another process is fetching it (wait()). */
  private async claim(i: number): Promise<boolean> {
    const lock = `${this.name(i)}.lock`
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const fh = await open(lock, 'wx', 0o600)
        await fh.write(`${process.pid}\n`).finally(() => fh.close())
        return true
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') return true // no cache to share: fetch
        if (!(await this.stale(lock))) return false
        await unlink(lock).catch(() => {})
      }
    }
    return false
  }

  /** claim() on the calling thread: true when this process may fetch block i (then putSync() or release()). */
  claimSync(i: number): boolean {
    const lock = `${this.name(i)}.lock`
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const fd = openSync(lock, 'wx', 0o600)
        try {
          writeSync(fd, `${process.pid}\n`)
        } finally {
          closeSync(fd)
        }
        return true
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') return true
        if (!this.staleSync(lock)) return false
        try {
          unlinkSync(lock)
        } catch {
          // taken over by another
        }
      }
    }
    return false
  }

  private async stale(lock: string): Promise<boolean> {
    const [text, st] = await Promise.all([readFile(lock, 'utf8').catch(() => ''), stat(lock).catch(() => null)])
    return this.isStale(text, st?.mtimeMs)
  }

  private staleSync(lock: string): boolean {
    try {
      return this.isStale(readFileSync(lock, 'utf8'), statSync(lock).mtimeMs)
    } catch {
      return true
    }
  }

  private isStale(text: string, mtimeMs: number | undefined): boolean {
    if (mtimeMs === undefined) return true
    const pid = Number(text.trim())
    if (text.endsWith('\n') && Number.isInteger(pid) && pid > 0 && !pidAlive(pid)) return true
    return Date.now() - mtimeMs > CLAIM_STALE_MS
  }

  /**
   * Block i from the cache, or from `fetch` (stored for the others): with the claim held, so
   * that of several processes that want it at once one fetches and the rest wait for its file.
   */
  async obtain(i: number, len: number, fetch: () => Promise<Buffer>): Promise<{ buf: Buffer; hit: boolean }> {
    for (let round = 0; ; round++) {
      const hit = await this.get(i, len)
      if (hit) return { buf: hit, hit: true }
      if (await this.claim(i)) {
        // Looked at again: the one that held the claim may have stored it just before.
        const again = await this.get(i, len)
        if (again) {
          this.release(i)
          return { buf: again, hit: true }
        }
        let buf: Buffer
        try {
          buf = await fetch()
        } catch (e) {
          this.release(i)
          throw e
        }
        await this.put(i, buf, true)
        return { buf, hit: false }
      }
      const waited = await this.wait(i, len)
      if (waited) return { buf: waited, hit: true }
      if (round >= 2) {
        const buf = await fetch() // claims keep failing (a cache we cannot write): fetch unshared
        await this.put(i, buf, false)
        return { buf, hit: false }
      }
    }
  }

  obtainSync(i: number, len: number, fetch: () => Buffer): { buf: Buffer; hit: boolean } {
    for (let round = 0; ; round++) {
      const hit = this.getSync(i, len)
      if (hit) return { buf: hit, hit: true }
      if (this.claimSync(i)) {
        const again = this.getSync(i, len)
        if (again) {
          this.release(i)
          return { buf: again, hit: true }
        }
        let buf: Buffer
        try {
          buf = fetch()
        } catch (e) {
          this.release(i)
          throw e
        }
        this.putSync(i, buf, true)
        return { buf, hit: false }
      }
      const waited = this.waitSync(i, len)
      if (waited) return { buf: waited, hit: true }
      if (round >= 2) {
        const buf = fetch()
        this.putSync(i, buf, false)
        return { buf, hit: false }
      }
    }
  }

  /** Block i once the process that claimed it has stored it; null when the claim went away without it, or went stale. */
  private async wait(i: number, len: number): Promise<Buffer | null> {
    const lock = `${this.name(i)}.lock`
    for (const until = Date.now() + WAIT_MS; Date.now() < until; ) {
      const got = await this.get(i, len)
      if (got) return got
      const st = await stat(lock).catch(() => null)
      if (!st) return this.get(i, len) // stored and let go just now, or given up
      if (await this.stale(lock)) return null
      await sleep(POLL_MS)
    }
    return null
  }

  private waitSync(i: number, len: number): Buffer | null {
    const lock = `${this.name(i)}.lock`
    for (const until = Date.now() + WAIT_MS; Date.now() < until; ) {
      const got = this.getSync(i, len)
      if (got) return got
      let exists = true
      try {
        statSync(lock)
      } catch {
        exists = false
      }
      if (!exists) return this.getSync(i, len)
      if (this.staleSync(lock)) return null
      Atomics.wait(sleeper, 0, 0, POLL_MS)
    }
    return null
  }

  /** Store block i (atomically) and let go of its claim, if `claimed`. */
  async put(i: number, buf: Buffer, claimed: boolean): Promise<void> {
    const f = this.name(i)
    const tmp = `${f}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`
    try {
      await writeFile(tmp, buf, { mode: 0o600 })
      await rename(tmp, f)
    } catch {
      await unlink(tmp).catch(() => {}) // a full disk: the cache is only a cache
    } finally {
      if (claimed) await unlink(`${f}.lock`).catch(() => {})
    }
    await this.added_(buf.length)
  }

  /** Store block i on the calling thread (atomically) and let go of its claim, if `claimed`. */
  putSync(i: number, buf: Buffer, claimed: boolean): void {
    const f = this.name(i)
    const tmp = `${f}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`
    try {
      writeFileSync(tmp, buf, { mode: 0o600 })
      renameSync(tmp, f)
    } catch {
      try {
        unlinkSync(tmp)
      } catch {
        // never written
      }
    } finally {
      if (claimed) this.release(i)
    }
    this.added += buf.length
    if (this.added > this.max / 8) {
      this.added = 0
      this.evictSync()
    }
  }

  /** Let go of a claim without storing. */
  release(i: number): void {
    try {
      unlinkSync(`${this.name(i)}.lock`)
    } catch {
      // not ours any more
    }
  }

  private async added_(n: number): Promise<void> {
    this.added += n
    if (this.added > this.max / 8) {
      this.added = 0
      await this.evict()
    }
  }

  /** Delete the least recently used blocks (of any object) until the cache holds at most `max` bytes. */
  async evict(): Promise<void> {
    const names = await readdir(this.dir).catch(() => [] as string[])
    const files = (await Promise.all(names.filter(isBlock).map(async (n) => {
      const st = await stat(join(this.dir, n)).catch(() => null)
      return st ? { n, size: st.size, t: st.mtimeMs } : null
    }))).filter((f) => f !== null)
    await Promise.all(overBound(files, this.max).map((n) => unlink(join(this.dir, n)).catch(() => {})))
  }

  evictSync(): void {
    let names: string[]
    try {
      names = readdirSync(this.dir)
    } catch {
      return
    }
    const files = names.filter(isBlock).map((n) => {
      try {
        const st = statSync(join(this.dir, n))
        return { n, size: st.size, t: st.mtimeMs }
      } catch {
        return null
      }
    }).filter((f) => f !== null)
    for (const n of overBound(files, this.max)) {
      try {
        unlinkSync(join(this.dir, n))
      } catch {
        // evicted by another process
      }
    }
  }
}

function isBlock(name: string): boolean {
  return /^[0-9a-f]{32}\.[0-9a-f]*\.\d+$/.test(name)
}

/** The oldest files to delete so that the rest hold at most `max` bytes. */
function overBound(files: Array<{ n: string; size: number; t: number }>, max: number): string[] {
  let total = files.reduce((a, f) => a + f.size, 0)
  const out: string[] = []
  for (const f of files.sort((a, b) => a.t - b.t)) {
    if (total <= max) break
    out.push(f.n)
    total -= f.size
  }
  return out
}
