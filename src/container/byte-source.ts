// Where an image's bytes come from: a size and positional reads, nothing else. ImageReader
// checks everything it reads (format-spec/container.md, "Reading an image") above this seam,
// like abstract-level's public methods over a backend's private hooks; a source only moves
// bytes. LocalFile is the one source today; an object store (S3 ranged GETs) is another
// implementation of the same interface, with no synchronous read and an index kept elsewhere.
import { readSync } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { SnapError, fromSystemError } from '../errors.js'
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

/** An image in a local regular file. */
export class LocalFile implements ByteSource {
  readonly indexPath: string

  private constructor(readonly path: string, private readonly fh: FileHandle, private readonly length: number) {
    this.indexPath = localIndexPath(path)
  }

  /**
   * Open `path` for reading. `whileCreating: 'refuse'` (load, verify): SNAP_LOCKED while a create
   * of this path runs, since the image there is about to be replaced.
   */
  static async open(path: string, opts: { whileCreating?: 'refuse' | 'allow' } = {}): Promise<LocalFile> {
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
      return new LocalFile(path, fh, st.size)
    } catch (e) {
      await fh.close().catch(() => {})
      throw fromSystemError(e, `reading ${path}`)
    }
  }

  async size(): Promise<number> {
    return this.length
  }

  async read(pos: number, len: number, into?: Buffer): Promise<Buffer> {
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

  async close(): Promise<void> {
    await this.fh.close().catch(() => {})
  }
}
