// Byte ranges of several buffers written to an fd in order with writev(2), by snapctl's addon
// (native/lz4/writev.c): load's page records go out as [header, page view] pairs, the pages never
// copied into a stream buffer. null where the addon is not built: callers then copy as before.
import { createRequire } from 'node:module'

export type WriteSegments = (fd: number, bufs: Uint8Array[], segs: Int32Array) => number

interface Addon {
  writeSegments?: WriteSegments
  adviseHugePages?: (buf: Uint8Array) => boolean
}

let addon: Addon | null | undefined
function load(): Addon | null {
  if (addon === undefined) {
    try {
      addon = createRequire(import.meta.url)('snapctl-lz4') as Addon
    } catch {
      addon = null
    }
  }
  return addon
}

export function nativeWriteSegments(): WriteSegments | null {
  return load()?.writeSegments ?? null
}

/**
 * A buffer in memory the writer thread shares (a view of it is posted, never copied). One of
 * 2 MiB or more is backed by huge pages where the kernel allows (transparent huge pages on
 * madvise): the 8 MiB read buffers of a restore then fault in a few times instead of 2,048.
 */
export function sharedBuffer(len: number): Buffer {
  const b = Buffer.from(new SharedArrayBuffer(len))
  if (len >= 2 << 20) load()?.adviseHugePages?.(b)
  return b
}
