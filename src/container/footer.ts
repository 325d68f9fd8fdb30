// The footer, the last 64 bytes of an image: format-spec/container.md, "Footer", and
// "Reading an image" step 3.
import { crc32 } from 'node:zlib'
import { Reader, Writer } from '../bytes.js'
import { SnapError } from '../errors.js'

export const FOOTER_MAGIC = Buffer.from([0x53, 0x4e, 0x41, 0x50, 0x45, 0x4e, 0x44, 0x1a])
export const FOOTER_SIZE = 64

export interface ImageFooter {
  uuid: Buffer
  trailerOffset: number
  trailerLength: number
  trailerCrc: number
  clusterCount: number
  generation: number
}

export function encodeFooter(f: ImageFooter): Buffer {
  const w = new Writer(Buffer.alloc(FOOTER_SIZE))
  w.bytes(FOOTER_MAGIC).bytes(f.uuid.subarray(0, 16)).u64(f.trailerOffset).u64(f.trailerLength)
  w.u32(f.trailerCrc).u32(f.clusterCount).u64(f.generation).zeros(4)
  w.u32(crc32(w.buf.subarray(0, 60)))
  return w.buf
}

/**
 * A footer that is missing or damaged means the image was never finished: the footer is
 * written last, so every failure here is SNAP_INCOMPLETE. `offset` is the footer's file offset.
 */
export function decodeFooter(buf: Buffer, offset = 0): ImageFooter {
  const incomplete = (why: string): never => {
    throw new SnapError('SNAP_INCOMPLETE', `the image has no valid footer (${why}): it was never finished`, { offset })
  }
  if (buf.length < FOOTER_SIZE) incomplete('too short')
  if (!buf.subarray(0, 8).equals(FOOTER_MAGIC)) incomplete('bad magic')
  if (buf.readUInt32BE(60) !== crc32(buf.subarray(0, 60))) incomplete('bad checksum')
  const r = new Reader(buf, 8, FOOTER_SIZE, 'SNAP_INCOMPLETE', offset)
  return {
    uuid: Buffer.from(r.bytes(16, 'uuid')),
    trailerOffset: r.u64('trailer_offset', 'SNAP_INCOMPLETE'),
    trailerLength: r.u64('trailer_length', 'SNAP_INCOMPLETE'),
    trailerCrc: r.u32('trailer_crc'),
    clusterCount: r.u32('cluster_count'),
    generation: r.u64('generation', 'SNAP_INCOMPLETE'),
  }
}
