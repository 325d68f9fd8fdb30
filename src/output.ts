// Where load's stream goes: standard output (the pipe QEMU reads in `exec:` migration) or a
// file. The bytes themselves are written by the pipe-writer thread (src/output-thread.ts);
// this opens the target and, for a file, syncs and closes it at the end.

import { constants as fsc } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { fromSystemError } from './errors.js'

export interface Output {
  /** the file descriptor to write to (1 for standard output) */
  readonly fd: number
  /** for messages: `standard output` or the file's path */
  readonly what: string
  close(): Promise<void>
}

export async function openOutput(to: string | undefined, opts: { force?: boolean } = {}): Promise<Output> {
  if (to === undefined) return { fd: 1, what: 'standard output', close: async () => {} }
  let fh: FileHandle
  try {
    const flags = fsc.O_WRONLY | fsc.O_CREAT | (opts.force ? fsc.O_TRUNC : fsc.O_EXCL)
    fh = await open(to, flags, 0o600)
  } catch (err) {
    throw fromSystemError(err, to)
  }
  return {
    fd: fh.fd,
    what: to,
    close: async () => {
      try {
        await fh.datasync()
      } finally {
        await fh.close()
      }
    },
  }
}
