// Byte ranges of several buffers written to an fd in order with writev(2), by snapctl's addon
// (native/lz4/writev.c): load's page records go out as [header, page view] pairs, the pages never
// copied into a stream buffer. null where the addon is not built: callers then copy as before.
import { nativeAddon } from '../native.js'

export type WriteSegments = (fd: number, bufs: Uint8Array[], segs: Int32Array) => number

export function nativeWriteSegments(): WriteSegments | null {
  return nativeAddon<{ writeSegments?: WriteSegments }>()?.writeSegments ?? null
}

/**
 * A buffer in memory the writer thread shares (a view of it is posted, never copied). Not
 * advised onto huge pages: that cut a 1 GiB load's faults from 25,800 to 19,400 but cost 0.05 s
 * more system time (the kernel compacting memory to find 2 MiB pages), 6 alternations each.
 */
export function sharedBuffer(len: number): Buffer {
  return Buffer.from(new SharedArrayBuffer(len))
}
