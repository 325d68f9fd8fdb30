// --bypass-cache: image I/O with O_DIRECT, so that saving or restoring a VM neither fills nor
// evicts the host's page cache (as `virsh save/restore --bypass-cache`, and QEMU's direct-io
// for mapped-ram). Chosen over fadvise(DONTNEED) behind the writer (`dd oflag=nocache`): Node
// has no posix_fadvise, and with it the pages still pass through the cache (and push other
// files out) before they are dropped. O_DIRECT needs the file offset, the length and the
// memory address aligned to the device's block size; offsets and lengths are (everything in an
// image is allocated in 4096-byte units, format-spec/container.md), and aligned memory is found
// by probing: a Buffer's backing store never moves, so we allocate 4096 bytes more than needed
// and take the first offset into it at which an O_DIRECT transfer of 4096 bytes is accepted
// (a misaligned one fails with EINVAL before any byte moves).
//
// A filesystem that refuses O_DIRECT at open (EINVAL: ramfs, tmpfs before Linux 6.6; their
// files live in the page cache anyway) falls back to ordinary I/O, with a one-line note for the
// caller to print: the save or restore still works, and there was no disk cache to spare.
import { constants, readSync, writeSync } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { dirname } from 'node:path'
import { roundUp } from '../bytes.js'
import { SnapError } from '../errors.js'

export const DIRECT_ALIGN = 4096
/** Addresses V8 hands out are at least this aligned: the probe steps by it. */
const PROBE_STEP = 16

/** The note printed when a filesystem refuses O_DIRECT. */
export function bypassRefusedNote(path: string): string {
  return `--bypass-cache: the filesystem of ${dirname(path)} refuses direct I/O (O_DIRECT: ramfs, or tmpfs before Linux 6.6, whose files live in the page cache anyway): going through the page cache`
}

/** `path` opened with O_DIRECT added to `flags`, or null when its filesystem refuses direct I/O. */
export async function openDirect(path: string, flags: number): Promise<FileHandle | null> {
  try {
    return await open(path, flags | constants.O_DIRECT)
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EINVAL') return null
    throw e
  }
}

/**
 * `size` bytes (a multiple of 4096) at an address `fd` accepts for O_DIRECT. `probe(buf, k)`
 * makes one O_DIRECT transfer of 4096 bytes at file offset 0 from or into buf[k..k+4096]: a
 * pread of a file that has them, or a pwrite of zeroes where zeroes belong (a new image's
 * header block). Returns null when no offset is accepted (a device with blocks above 4 KiB).
 */
export function alignedBuffer(size: number, probe: (buf: Buffer, at: number) => void): Buffer | null {
  const buf = Buffer.allocUnsafeSlow(size + DIRECT_ALIGN)
  buf.fill(0, 0, 2 * DIRECT_ALIGN)
  for (let k = 0; k < DIRECT_ALIGN; k += PROBE_STEP) {
    try {
      probe(buf, k)
      return buf.subarray(k, k + size)
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw e
    }
  }
  return null
}

export const probeRead = (fd: number) => (buf: Buffer, at: number): void => void readSync(fd, buf, at, DIRECT_ALIGN, 0)
export const probeWriteZeros = (fd: number) => (buf: Buffer, at: number): void => {
  if (writeSync(fd, buf, at, DIRECT_ALIGN, 0) !== DIRECT_ALIGN) throw Object.assign(new Error('short write'), { code: 'ENOSPC' })
}

/**
 * Aligned buffers for one O_DIRECT file, handed out and given back: `slots` of `size` bytes
 * (as many transfers as may be in flight at once), more made on demand when a caller asks
 * for more bytes than a slot holds.
 */
export class AlignedPool {
  private readonly free: Buffer[] = []
  private readonly known = new WeakMap<ArrayBufferLike, number>()
  private waiters: Array<() => void> = []
  private made = 0

  constructor(
    private readonly size: number,
    private readonly slots: number,
    private readonly probe: (buf: Buffer, at: number) => void,
  ) {}

  /** A buffer of at least `len` bytes, now; made (probed) if none is free. */
  takeSync(len: number): Buffer {
    const i = this.free.findIndex((b) => b.length >= len)
    if (i >= 0) return this.free.splice(i, 1)[0]
    const b = alignedBuffer(roundUp(Math.max(len, this.size), DIRECT_ALIGN), this.probe)
    if (!b) throw new SnapError('SNAP_IO', 'no memory address is accepted for direct I/O (--bypass-cache) on this device')
    this.known.set(b.buffer, b.byteOffset % DIRECT_ALIGN)
    this.made++
    return b
  }

  /** A slot of `size` bytes, waiting while `slots` are in use. */
  async take(): Promise<Buffer> {
    while (this.free.length === 0 && this.made >= this.slots) await new Promise<void>((r) => this.waiters.push(r))
    return this.takeSync(this.size)
  }

  give(b: Buffer): void {
    this.free.push(b)
    const w = this.waiters.shift()
    w?.()
  }

  /** Whether `b` starts at an aligned address of one of our buffers (then O_DIRECT can use it as is). */
  aligned(b: Buffer): boolean {
    const base = this.known.get(b.buffer)
    return base !== undefined && (b.byteOffset - base) % DIRECT_ALIGN === 0
  }
}

/**
 * Write `parts` (back to back) at `pos` (a multiple of 4096) through `fh` opened O_DIRECT,
 * copying them into aligned slots and padding the last one with zeroes to a multiple of 4096.
 */
export async function writeDirect(fh: FileHandle, pool: AlignedPool, parts: Buffer[], pos: number): Promise<void> {
  let part = 0
  let at = 0
  while (part < parts.length) {
    const slot = await pool.take()
    try {
      let n = 0
      while (part < parts.length && n < slot.length) {
        const p = parts[part]
        const k = p.copy(slot, n, at)
        n += k
        at += k
        if (at === p.length) {
          part++
          at = 0
        }
      }
      const len = roundUp(n, DIRECT_ALIGN)
      slot.fill(0, n, len)
      for (let done = 0; done < len; ) {
        const { bytesWritten } = await fh.write(slot, done, len - done, pos + done)
        if (bytesWritten === 0) throw Object.assign(new Error('short write'), { code: 'ENOSPC' })
        done += bytesWritten
      }
      pos += len
    } finally {
      pool.give(slot)
    }
  }
}
