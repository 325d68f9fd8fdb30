// Where load's stream goes: standard output (the pipe QEMU reads in `exec:` migration), a file,
// or a device or pipe named by --to. The bytes themselves are written by the pipe-writer thread
// (src/transport/output-thread.ts); this opens the target and finishes or discards it.
//
// A regular file is written like an image (format-spec/container.md, "Writing an image"): under
// `.NAME.partial-PID` beside NAME, synced and renamed into place once complete, removed on
// failure or signal, so that a cut stream never sits at NAME. A character device (/dev/null) or
// a FIFO is opened and written as it is: no --force, no temporary name, no sync.

import { constants as fsc, type Stats } from 'node:fs'
import { open, unlink, type FileHandle } from 'node:fs/promises'
import { partialPath } from '../container/lock.js'
import { SnapError, fromSystemError } from '../errors.js'
import { checkOutputFile, renameIntoPlace } from '../paths.js'

export interface Output {
  /** the file descriptor to write to (1 for standard output) */
  readonly fd: number
  /** for messages: `standard output` or the path */
  readonly what: string
  /** everything is written: make it durable and give it its name */
  close(): Promise<void>
  /** the work failed or was interrupted: remove what was written; says what it removed */
  discard(): Promise<string | void>
}

export async function openOutput(to: string | undefined, opts: { force?: boolean } = {}): Promise<Output> {
  if (to === undefined) return { fd: 1, what: 'standard output', close: async () => {}, discard: async () => {} }
  const st = await checkOutputFile(to, '--to')
  if (st && !st.isFile()) return openSpecial(to, st, opts.force === true)
  if (st && !opts.force) throw new SnapError('SNAP_EXISTS', `${to} exists (use --force to replace it)`)
  const partial = partialPath(to)
  let fh: FileHandle
  try {
    // Our PID is in the name: a file there is what a dead process with our PID left.
    fh = await open(partial, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_TRUNC, 0o600)
  } catch (err) {
    throw fromSystemError(err, `creating ${partial}`)
  }
  let live = true
  const drop = async (): Promise<void> => {
    if (!live) return
    live = false
    await fh.close().catch(() => {})
    await unlink(partial).catch(() => {})
  }
  return {
    fd: fh.fd,
    what: to,
    close: async () => {
      try {
        await fh.datasync()
        await renameIntoPlace(partial, to, opts.force === true)
      } catch (err) {
        await drop()
        throw fromSystemError(err, `writing ${to}`)
      }
      live = false
      await fh.close()
    },
    discard: async () => {
      if (!live) return
      await drop()
      return `the partial ${to} was removed`
    },
  }
}

/** A device or pipe: written in place. A block device is a disk: only with --force. */
async function openSpecial(to: string, st: Stats, force: boolean): Promise<Output> {
  const block = st.isBlockDevice()
  if (!block && !st.isCharacterDevice() && !st.isFIFO()) {
    throw new SnapError('SNAP_BAD_PATH', `--to ${to} is neither a file, a device nor a pipe`)
  }
  if (block && !force) throw new SnapError('SNAP_EXISTS', `${to} is a block device: use --force to overwrite it`)
  let fh: FileHandle
  try {
    fh = await open(to, fsc.O_WRONLY)
  } catch (err) {
    throw fromSystemError(err, to)
  }
  return {
    fd: fh.fd,
    what: to,
    close: async () => {
      try {
        if (block) await fh.datasync()
      } finally {
        await fh.close()
      }
    },
    discard: async () => {
      await fh.close().catch(() => {})
    },
  }
}
