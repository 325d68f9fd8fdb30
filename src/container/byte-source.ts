// Where an image's bytes come from: a size and positional reads, nothing else. ImageReader
// checks everything it reads (format-spec/container.md, "Reading an image") above this seam,
// like abstract-level's public methods over a backend's private hooks; a source only moves
// bytes. LocalFile is the one source today; an object store (S3 ranged GETs) is another
// implementation of the same interface, with no synchronous read and an index kept elsewhere.
import { constants, readSync } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { roundUp } from '../bytes.js'
import { SnapError, fromSystemError } from '../errors.js'
import { AlignedPool, DIRECT_ALIGN, bypassRefusedNote, openDirect, probeRead } from './direct-io.js'
import { refuseWhileCreating } from './lock.js'

export interface ByteSource {
  /** for messages, and the image's name in the index stamp */
  readonly path: string
  /** where this image's LevelDB page index lives (format-spec/index.md), or null for none */
  readonly indexPath: string | null
  size(): Promise<number>
  /**
   * exactly `len` bytes from `pos`, or SNAP_TRUNCATED where the source ends first; into the
   * start of `into` when the source can (a reused buffer: no fresh memory per read), so use
   * the buffer it returns
   */
  read(pos: number, len: number, into?: Buffer): Promise<Buffer>
  /** the same on the calling thread (lazy restore); sources that cannot leave it out */
  readSync?(pos: number, len: number): Buffer
  /**
   * a buffer of `len` bytes that read() fills without a copy (an aligned one for O_DIRECT), or
   * `fresh(len)` where any buffer does; sources without the hook are given fresh(len)
   */
  buffer?(len: number, fresh?: (len: number) => Buffer): Buffer
  /**
   * ranges (offset, length) a reader will want soon, most wanted first, for a source where
   * fetching ahead pays (object storage); a hint only: reads stay exact whatever it does
   */
  prefetch?(ranges: ReadonlyArray<readonly [number, number]>): void
  /** why the source could not do what it was asked (--bypass-cache refused), for the caller to print */
  readonly note?: string | null
  close(): Promise<void>
}

/** The page index of a local image: a directory beside it. */
export function localIndexPath(imagePath: string): string {
  return `${imagePath}.index`
}

function short(pos: number, got: number, len: number): SnapError {
  return new SnapError('SNAP_TRUNCATED', `the image ends at ${pos + got}, before ${pos + len}`, { offset: pos + got })
}

/** Fill `buf` from `pos` on the calling thread; the bytes read (fewer at the end of the file). */
export function readFullySync(fd: number, buf: Buffer, pos: number): number {
  let got = 0
  while (got < buf.length) {
    const n = readSync(fd, buf, got, buf.length - got, pos + got)
    if (n === 0) break
    got += n
  }
  return got
}

/** Buffers for reads that are not given an aligned one (header, trailer, random access). */
const BOUNCE_BYTES = 1 << 20

/** An image in a local regular file; with `bypassCache`, read with O_DIRECT (direct-io.ts). */
export class LocalFile implements ByteSource {
  readonly indexPath: string
  note: string | null = null
  private direct: { fh: FileHandle; pool: AlignedPool } | null = null

  private constructor(readonly path: string, private readonly fh: FileHandle, private readonly length: number) {
    this.indexPath = localIndexPath(path)
  }

  private async openDirect(): Promise<void> {
    const dfh = await openDirect(this.path, constants.O_RDONLY)
    if (!dfh) {
      this.note = bypassRefusedNote(this.path)
      return
    }
    // Probed by reading the image's first block (an image is never shorter: checked before its clusters are read).
    this.direct = { fh: dfh, pool: new AlignedPool(BOUNCE_BYTES, Infinity, probeRead(dfh.fd)) }
  }

  buffer(len: number, fresh: (len: number) => Buffer = Buffer.allocUnsafeSlow): Buffer {
    return this.direct ? this.direct.pool.takeSync(roundUp(len, DIRECT_ALIGN)) : fresh(len)
  }

  /**
   * O_DIRECT: the whole 4096-byte blocks around [pos, pos + len), straight into `into` when it
   * is aligned and the range starts on a block, else into an aligned buffer and copied out.
   */
  private async readDirect(d: { fh: FileHandle; pool: AlignedPool }, pos: number, len: number, into?: Buffer): Promise<Buffer> {
    const start = pos - (pos % DIRECT_ALIGN)
    const span = roundUp(pos + len, DIRECT_ALIGN) - start
    const inPlace = into !== undefined && start === pos && into.length >= span && d.pool.aligned(into)
    const buf = inPlace ? into : d.pool.takeSync(span)
    try {
      let got = 0
      while (got < span) {
        const { bytesRead } = await d.fh.read(buf, got, span - got, start + got)
        if (bytesRead === 0) break
        got += bytesRead
      }
      if (got < pos - start + len) throw short(pos, Math.max(0, got - (pos - start)), len)
      if (inPlace) return buf.subarray(0, len)
      const out = into && into.length >= len ? into.subarray(0, len) : Buffer.allocUnsafe(len)
      buf.copy(out, 0, pos - start, pos - start + len)
      return out
    } finally {
      if (!inPlace) d.pool.give(buf)
    }
  }

  /**
   * Open `path` for reading. `whileCreating: 'refuse'` (load, verify): SNAP_LOCKED while a create
   * of this path runs, since the image there is about to be replaced.
   */
  static async open(path: string, opts: { whileCreating?: 'refuse' | 'allow'; bypassCache?: boolean } = {}): Promise<LocalFile> {
    if (path.trim() === '') throw new SnapError('SNAP_BAD_PATH', 'the image path is empty')
    if (opts.whileCreating === 'refuse') await refuseWhileCreating(path)
    let fh: FileHandle
    try {
      fh = await open(path, 'r')
    } catch (e) {
      throw fromSystemError(e, `opening ${path}`)
    }
    try {
      const st = await fh.stat()
      if (st.isDirectory()) throw new SnapError('SNAP_BAD_PATH', `${path} is a directory, not an image`)
      if (!st.isFile()) throw new SnapError('SNAP_BAD_MAGIC', `${path} is not a regular file`)
      const f = new LocalFile(path, fh, st.size)
      if (opts.bypassCache) await f.openDirect()
      return f
    } catch (e) {
      await fh.close().catch(() => {})
      throw fromSystemError(e, `reading ${path}`)
    }
  }

  async size(): Promise<number> {
    return this.length
  }

  async read(pos: number, len: number, into?: Buffer): Promise<Buffer> {
    if (this.direct) return this.readDirect(this.direct, pos, len, into).catch((e) => Promise.reject(fromSystemError(e, 'reading the image')))
    const buf = into && into.length >= len ? into.subarray(0, len) : Buffer.allocUnsafe(len)
    let got = 0
    try {
      while (got < len) {
        const { bytesRead } = await this.fh.read(buf, got, len - got, pos + got)
        if (bytesRead === 0) break
        got += bytesRead
      }
    } catch (e) {
      throw fromSystemError(e, 'reading the image')
    }
    if (got < len) throw short(pos, got, len)
    return buf
  }

  readSync(pos: number, len: number): Buffer {
    if (this.direct) return this.readDirectSync(this.direct.fh.fd, this.direct.pool, pos, len)
    const buf = Buffer.allocUnsafe(len)
    let got: number
    try {
      got = readFullySync(this.fh.fd, buf, pos)
    } catch (e) {
      throw fromSystemError(e, 'reading the image')
    }
    if (got < len) throw short(pos, got, len)
    return buf
  }

  private readDirectSync(fd: number, pool: AlignedPool, pos: number, len: number): Buffer {
    const start = pos - (pos % DIRECT_ALIGN)
    const span = roundUp(pos + len, DIRECT_ALIGN) - start
    const buf = pool.takeSync(span)
    try {
      let got: number
      try {
        got = readFullySync(fd, buf.subarray(0, span), start)
      } catch (e) {
        throw fromSystemError(e, 'reading the image')
      }
      if (got < pos - start + len) throw short(pos, Math.max(0, got - (pos - start)), len)
      return Buffer.from(buf.subarray(pos - start, pos - start + len))
    } finally {
      pool.give(buf)
    }
  }

  async close(): Promise<void> {
    await this.direct?.fh.close().catch(() => {})
    await this.fh.close().catch(() => {})
  }
}
