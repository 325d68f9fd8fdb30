// Data clusters: format-spec/container.md, "Cluster header", "Codecs" and "Reading an image"
// step 5. Every failure names the cluster (its sequence number) and its file offset.
import { crc32 } from 'node:zlib'
import lz4 from 'lz4-napi'
import { Reader, Writer, roundUp } from '../bytes.js'
import { SnapError, type ErrorCode } from '../errors.js'
import { ALIGN } from './header.js'
import { Lz4Error, decodeLz4Block } from './lz4-block.js'

export const CLUSTER_MAGIC = Buffer.from([0x53, 0x4e, 0x43, 0x4c])
export const CODEC_NONE = 0
export const CODEC_LZ4 = 1
/** Bytes of the header before the pages list, and the crc after it. */
const FIXED = 32

export interface ClusterHeader {
  sequence: number
  codec: number
  flags: number
  pageCount: number
  rawLength: number
  storedLength: number
  dataCrc: number
  /** page_count (block_id, page_index) pairs, in slot order */
  pages: Uint32Array
}

/** Where a cluster is, for error details. */
export interface ClusterWhere {
  cluster: number
  offset: number
}

export const clusterHeaderLength = (pageCount: number): number => FIXED + 8 * pageCount + 4
/** The header padded to the 4096 boundary where the payload starts. */
export const clusterHeaderBlock = (pageCount: number): number => roundUp(clusterHeaderLength(pageCount), ALIGN)
/** The whole cluster on disk: header block, payload, padding. */
export const clusterExtent = (pageCount: number, storedLength: number): number =>
  clusterHeaderBlock(pageCount) + roundUp(storedLength, ALIGN)
/** The largest stored_length codec 1 may have (see "Cluster header"). */
export const maxLz4Stored = (rawLength: number): number => rawLength - rawLength / 8 + 4

/** Encode the header, zero padded to its 4096-byte block. */
export function encodeClusterHeader(h: ClusterHeader): Buffer {
  const len = clusterHeaderLength(h.pageCount)
  const w = new Writer(Buffer.alloc(roundUp(len, ALIGN)))
  w.bytes(CLUSTER_MAGIC).u32(len).u32(h.sequence).u8(h.codec).u8(h.flags).u16(0)
  w.u32(h.pageCount).u32(h.rawLength).u32(h.storedLength).u32(h.dataCrc)
  for (let i = 0; i < 2 * h.pageCount; i++) w.u32(h.pages[i])
  w.u32(crc32(w.buf.subarray(0, len - 4)))
  return w.buf
}

export interface ClusterLimits {
  pageSize: number
  /** cluster_size / page_size */
  maxPages: number
}

function err(code: ErrorCode, where: ClusterWhere, msg: string): SnapError {
  return new SnapError(code, `cluster ${where.cluster} at offset ${where.offset}: ${msg}`, { ...where })
}

/**
 * Decode the header that starts at buf[at]; `where.cluster` is the sequence number it must
 * carry. Everything but the payload is checked here, in the spec's order.
 */
export function decodeClusterHeader(buf: Buffer, at: number, where: ClusterWhere, lim: ClusterLimits): ClusterHeader {
  const r = new Reader(buf, at, buf.length, 'SNAP_CORRUPT', 0)
  if (r.left < FIXED + 4) throw err('SNAP_CORRUPT', where, 'the cluster header is cut short')
  if (!r.bytes(4).equals(CLUSTER_MAGIC)) throw err('SNAP_CORRUPT', where, 'bad cluster magic')
  const headerLength = r.u32()
  const sequence = r.u32()
  const codec = r.u8()
  const flags = r.u8()
  r.u16()
  const pageCount = r.u32()
  if (pageCount < 1 || pageCount > lim.maxPages) throw err('SNAP_CORRUPT', where, `page_count ${pageCount} is out of range`)
  if (headerLength !== clusterHeaderLength(pageCount)) throw err('SNAP_CORRUPT', where, `header_length ${headerLength} does not match page_count ${pageCount}`)
  if (sequence !== where.cluster) throw err('SNAP_CORRUPT', where, `sequence ${sequence} is not its position ${where.cluster}`)
  if (headerLength > buf.length - at) throw err('SNAP_CORRUPT', where, 'the cluster header is cut short')
  if (buf.readUInt32BE(at + headerLength - 4) !== crc32(buf.subarray(at, at + headerLength - 4))) {
    throw err('SNAP_CHECKSUM', where, 'the cluster header checksum does not match')
  }
  if (codec !== CODEC_NONE && codec !== CODEC_LZ4) throw err('SNAP_UNSUPPORTED_CODEC', where, `codec ${codec} is unknown`)
  const rawLength = r.u32()
  const storedLength = r.u32()
  const dataCrc = r.u32()
  if (rawLength !== pageCount * lim.pageSize) throw err('SNAP_CORRUPT', where, `raw_length ${rawLength} is not page_count × page_size`)
  if (codec === CODEC_NONE ? storedLength !== rawLength : storedLength <= 4 || storedLength > maxLz4Stored(rawLength)) {
    throw err('SNAP_CORRUPT', where, `stored_length ${storedLength} is out of range for codec ${codec}`)
  }
  const pages = new Uint32Array(2 * pageCount)
  for (let i = 0; i < pages.length; i++) pages[i] = r.u32()
  return { sequence, codec, flags, pageCount, rawLength, storedLength, dataCrc, pages }
}

/** Check data_crc and the LZ4 length prefix: everything that can be checked before decoding. */
function checkStored(h: ClusterHeader, stored: Uint8Array, where: ClusterWhere): void {
  if (stored.length !== h.storedLength) throw err('SNAP_CORRUPT', where, 'the payload is cut short')
  if (crc32(stored) !== h.dataCrc) throw err('SNAP_CHECKSUM', where, 'the payload checksum does not match')
  // lz4-napi sizes its output from the prefix: check it before it allocates anything.
  if (h.codec === CODEC_LZ4 && Buffer.from(stored.buffer, stored.byteOffset, 4).readUInt32LE(0) !== h.rawLength) {
    throw err('SNAP_CORRUPT', where, 'the LZ4 length prefix is not raw_length')
  }
}

function checkDecoded(h: ClusterHeader, raw: Buffer, where: ClusterWhere): Buffer {
  if (raw.length !== h.rawLength) throw err('SNAP_CORRUPT', where, `the payload decodes to ${raw.length} bytes, not ${h.rawLength}`)
  return raw
}

/** Check and decode a payload; LZ4 runs on the libuv pool. Returns the raw pages. */
export async function decodePayload(h: ClusterHeader, stored: Buffer, where: ClusterWhere): Promise<Buffer> {
  checkStored(h, stored, where)
  if (h.codec === CODEC_NONE) return stored
  let raw: Buffer
  try {
    raw = await lz4.uncompress(stored)
  } catch (e) {
    throw err('SNAP_CORRUPT', where, `the LZ4 payload does not decode (${(e as Error).message})`)
  }
  return checkDecoded(h, raw, where)
}

/**
 * The same on the calling thread. With `into` (at least raw_length bytes, reused by the caller)
 * an LZ4 payload decodes into it (lz4-block.ts) and a subarray of it comes back: no fresh
 * memory per cluster. Without, lz4-napi allocates the result.
 */
export function decodePayloadSync(h: ClusterHeader, stored: Buffer, where: ClusterWhere, into?: Buffer): Buffer {
  checkStored(h, stored, where)
  if (h.codec === CODEC_NONE) return stored
  if (into && into.length >= h.rawLength) {
    try {
      decodeLz4Block(stored, 4, stored.length, into, h.rawLength)
    } catch (e) {
      if (!(e instanceof Lz4Error)) throw e
      throw err('SNAP_CORRUPT', where, `the LZ4 payload does not decode (${e.message})`)
    }
    return into.subarray(0, h.rawLength)
  }
  let raw: Buffer
  try {
    raw = lz4.uncompressSync(stored)
  } catch (e) {
    throw err('SNAP_CORRUPT', where, `the LZ4 payload does not decode (${(e as Error).message})`)
  }
  return checkDecoded(h, raw, where)
}

/**
 * Decode a whole cluster held in `buf` (header block, payload and padding: exactly its
 * extent). Checks that the extent matches the header.
 */
export function splitCluster(buf: Buffer, where: ClusterWhere, lim: ClusterLimits): { header: ClusterHeader; stored: Buffer } {
  const header = decodeClusterHeader(buf, 0, where, lim)
  const extent = clusterExtent(header.pageCount, header.storedLength)
  if (extent !== buf.length) {
    throw err('SNAP_CORRUPT', where, `the cluster takes ${extent} bytes but the next one starts ${buf.length} bytes on`)
  }
  const start = clusterHeaderBlock(header.pageCount)
  return { header, stored: buf.subarray(start, start + header.storedLength) }
}
