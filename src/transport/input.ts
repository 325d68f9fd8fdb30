// Where create's bytes come from: standard input (a pipe from QEMU's `exec:` migration) or a
// file (a saved stream, or a libvirt save image whose QEMU stream starts after its header).

import { open, type FileHandle } from 'node:fs/promises'
import { fromSystemError } from '../errors.js'
import { readThreaded } from './input-thread.js'

const READ_SIZE = 4 << 20

/** Opens an input file for reading; a missing or unreadable one is the SnapError its errno says. */
export async function openInput(path: string): Promise<FileHandle> {
  try {
    return await open(path, 'r')
  } catch (err) {
    throw fromSystemError(err, path)
  }
}

/** Yields the input in chunks. Each chunk is a fresh buffer the consumer may keep. */
export async function* readInput(from: string | undefined): AsyncGenerator<Buffer> {
  if (from === undefined) {
    yield* readThreaded(0, 'standard input')
    return
  }
  const fh = await openInput(from)
  try {
    let pos = 0
    for (;;) {
      const buf = Buffer.allocUnsafe(READ_SIZE)
      const { bytesRead } = await fh.read(buf, 0, READ_SIZE, pos)
      if (bytesRead === 0) return
      pos += bytesRead
      yield buf.subarray(0, bytesRead)
    }
  } catch (err) {
    throw fromSystemError(err, from)
  } finally {
    await fh.close()
  }
}
