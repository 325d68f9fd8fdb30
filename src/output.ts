// Where load's stream goes: standard output (the pipe QEMU reads in `exec:` migration) or a
// file. Large writes are what make a pipe fast (DESIGN.md: 1-4 MiB writes run level with
// `cat`, 64 KiB ones at a third of its speed), so callers hand us multi-MiB chunks and we
// write them with one system call each, one write in flight at a time.

import { write as fsWrite, constants as fsc } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { promisify } from 'node:util'
import { fromSystemError, SnapError } from './errors.js'

const writeAsync = promisify(fsWrite)

export interface Output {
  write(chunk: Buffer): Promise<void>
  close(): Promise<void>
  readonly bytes: number
  /** the file descriptor written to (1 for standard output) */
  readonly fd: number
  /** for messages: `standard output` or the file's path */
  readonly what: string
}

export async function openOutput(to: string | undefined, opts: { force?: boolean } = {}): Promise<Output> {
  if (to === undefined) return new FdOutput(1, 'standard output')
  let fh: FileHandle
  try {
    const flags = fsc.O_WRONLY | fsc.O_CREAT | (opts.force ? fsc.O_TRUNC : fsc.O_EXCL)
    fh = await open(to, flags, 0o600)
  } catch (err) {
    throw fromSystemError(err, to)
  }
  return new FdOutput(fh.fd, to, fh)
}

class FdOutput implements Output {
  bytes = 0
  constructor(
    readonly fd: number,
    readonly what: string,
    private readonly fh?: FileHandle,
  ) {}

  async write(chunk: Buffer): Promise<void> {
    let off = 0
    while (off < chunk.length) {
      let n: number
      try {
        n = (await writeAsync(this.fd, chunk, off, chunk.length - off, null)).bytesWritten
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code
        // A pipe someone else switched to non-blocking mode: wait for room and retry.
        if (code === 'EAGAIN') {
          await new Promise((r) => setTimeout(r, 1))
          continue
        }
        if (code === 'EPIPE') {
          throw new SnapError('SNAP_IO', `${this.what}: the reader closed the pipe (did the destination QEMU fail?)`, { cause: err })
        }
        throw fromSystemError(err, this.what)
      }
      off += n
      this.bytes += n
    }
  }

  async close(): Promise<void> {
    if (this.fh) {
      try {
        await this.fh.datasync()
      } finally {
        await this.fh.close()
      }
    }
  }
}
