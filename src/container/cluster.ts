// Data clusters: format-spec/container.md, "Cluster header", "Codecs" and "Reading an image"
// step 5. Every failure names the cluster (its sequence number) and its file offset.
import { createRequire } from 'node:module'
import type Lz4Napi from 'lz4-napi'
import { Reader, Writer, roundUp } from '../bytes.js'
import { SnapError, type ErrorCode } from '../errors.js'
import { crc32 } from './crc.js'
import { ALIGN } from './header.js'
import { Lz4Error, compressLz4Into, decodeLz4Block, nativeLz4 } from './lz4-block.js'

// lz4-napi (a native addon, ~20 ms of CPU to load) on first use, not at import: a lazy restore
// sends the device state before it decodes any cluster, and the VM can run sooner by that much.
const requireCjs = createRequire(import.meta.url)
let lz4Module: typeof Lz4Napi | undefined
function lz4(): typeof Lz4Napi {
  return (lz4Module ??= requireCjs('lz4-napi') as typeof Lz4Napi)
}

export const CLUSTER_MAGIC = Buffer.from([0x53, 0x4e, 0x43, 0x4c])
export const CODEC_NONE = 0
export const CODEC_LZ4 = 1
/** Cluster flags bit 0: the LZ4 payload is a run of independently decodable frames. */
export const FLAG_FRAMED = 1
/**
 * Pages per frame that create writes: 128 KiB, what a page request decodes (see "Frames"). Measured
 * on a 1 GiB stream of the benchmark mix: 64 KiB frames made the image 3.2% larger, 128 KiB 1.1%.
 */
export const DEFAULT_FRAME_PAGES = 32
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
  /** framed clusters (flags bit 0): pages per frame, else 0 */
  framePages: number
  /** framed clusters: (stored_length, crc) per frame, in payload order; else empty */
  frames: Uint32Array
}

/** Where a cluster is, for error details. */
export interface ClusterWhere {
  cluster: number
  offset: number
}

export const clusterHeaderLength = (pageCount: number, frameCount = 0): number => FIXED + 8 * pageCount + 8 * frameCount + 4
/** The header padded to the 4096 boundary where the payload starts. */
export const clusterHeaderBlock = (pageCount: number, frameCount = 0): number => roundUp(clusterHeaderLength(pageCount, frameCount), ALIGN)
/** The whole cluster on disk: header block, payload, padding. */
export const clusterExtent = (pageCount: number, storedLength: number, frameCount = 0): number =>
  clusterHeaderBlock(pageCount, frameCount) + roundUp(storedLength, ALIGN)
/** Frames of a cluster: none unless framed. */
export const frameCount = (h: { pageCount: number; framePages: number }): number => (h.framePages ? Math.ceil(h.pageCount / h.framePages) : 0)
/** The largest stored_length codec 1 may have (see "Cluster header"). */
export const maxLz4Stored = (rawLength: number): number => rawLength - rawLength / 8 + 4

/** Encode the header, zero padded to its 4096-byte block. */
export function encodeClusterHeader(h: ClusterHeader): Buffer {
  const len = clusterHeaderLength(h.pageCount, h.frames.length / 2)
  const w = new Writer(Buffer.alloc(roundUp(len, ALIGN)))
  w.bytes(CLUSTER_MAGIC).u32(len).u32(h.sequence).u8(h.codec).u8(h.flags).u16(h.framePages)
  w.u32(h.pageCount).u32(h.rawLength).u32(h.storedLength).u32(h.dataCrc)
  for (let i = 0; i < 2 * h.pageCount; i++) w.u32(h.pages[i])
  for (let i = 0; i < h.frames.length; i++) w.u32(h.frames[i])
  w.u32(crc32(w.buf.subarray(0, len - 4)))
  return w.buf
}

export interface ClusterLimits {
  pageSize: number
  /** cluster_size / page_size */
  maxPages: number
  /** the image header has incompatible bit 3 (framed_clusters): clusters may be framed */
  framed?: boolean
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
  const framePages = r.u16()
  const pageCount = r.u32()
  if (pageCount < 1 || pageCount > lim.maxPages) throw err('SNAP_CORRUPT', where, `page_count ${pageCount} is out of range`)
  if (flags & ~FLAG_FRAMED || (flags === FLAG_FRAMED && !lim.framed)) throw err('SNAP_CORRUPT', where, `flags ${flags} are not allowed in this image`)
  if (flags === FLAG_FRAMED ? framePages < 1 || framePages > lim.maxPages : framePages !== 0) {
    throw err('SNAP_CORRUPT', where, `frame_pages ${framePages} is out of range`)
  }
  const frames = frameCount({ pageCount, framePages })
  if (headerLength !== clusterHeaderLength(pageCount, frames)) throw err('SNAP_CORRUPT', where, `header_length ${headerLength} does not match page_count ${pageCount}`)
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
  if (frames && codec !== CODEC_LZ4) throw err('SNAP_CORRUPT', where, `a framed cluster with codec ${codec}`)
  const pages = new Uint32Array(2 * pageCount)
  for (let i = 0; i < pages.length; i++) pages[i] = r.u32()
  const table = new Uint32Array(2 * frames)
  for (let i = 0; i < table.length; i++) table[i] = r.u32()
  const h = { sequence, codec, flags, pageCount, rawLength, storedLength, dataCrc, pages, framePages, frames: table }
  if (frames) checkFrameTable(h, lim.pageSize, where)
  return h
}

/** Bytes [start, end) of frame `i` in the stored payload, and how many bytes it decodes to. */
export interface FrameExtent {
  start: number
  end: number
  rawLength: number
}

/** Every frame of a framed cluster, in payload order (the frames' stored lengths add up, in order). */
export function frameLayout(h: ClusterHeader, pageSize: number): FrameExtent[] {
  const out: FrameExtent[] = []
  for (let i = 0, start = 0; i < h.frames.length / 2; start += h.frames[2 * i], i++) {
    const pages = Math.min(h.framePages, h.pageCount - i * h.framePages)
    out.push({ start, end: start + h.frames[2 * i], rawLength: pages * pageSize })
  }
  return out
}

/** Where frame `i` is in the payload. */
export function frameExtent(h: ClusterHeader, i: number, pageSize: number): FrameExtent {
  return frameLayout(h, pageSize)[i]
}

/** A frame is stored raw (its length is its raw length) or as LZ4 with a length prefix (shorter). */
function checkFrameTable(h: ClusterHeader, pageSize: number, where: ClusterWhere): void {
  const layout = frameLayout(h, pageSize)
  layout.forEach(({ start, end, rawLength }, i) => {
    const len = end - start
    if (len !== rawLength && (len <= 4 || len > rawLength)) throw err('SNAP_CORRUPT', where, `frame ${i}'s stored_length ${len} is out of range`)
  })
  const sum = layout.length ? layout[layout.length - 1].end : 0
  if (sum !== h.storedLength) throw err('SNAP_CORRUPT', where, `the frames add up to ${sum} bytes, not stored_length ${h.storedLength}`)
}

/** An LZ4 frame's length prefix must be its raw length: checked before anything is sized by it. */
function checkFramePrefix(frame: Buffer, rawLength: number, where: ClusterWhere, i: number): void {
  if (frame.length !== rawLength && frame.readUInt32LE(0) !== rawLength) throw err('SNAP_CORRUPT', where, `frame ${i}'s LZ4 length prefix is not its raw length`)
}

/** data_crc of a framed cluster: the CRC-32 of its frame table (each frame has its own crc). */
export function frameTableCrc(frames: Uint32Array): number {
  const b = Buffer.allocUnsafe(4 * frames.length)
  for (let i = 0; i < frames.length; i++) b.writeUInt32BE(frames[i], 4 * i)
  return crc32(b)
}

/** Check data_crc and the LZ4 length prefix: everything that can be checked before decoding. */
function checkStored(h: ClusterHeader, stored: Uint8Array, where: ClusterWhere): void {
  if (stored.length !== h.storedLength) throw err('SNAP_CORRUPT', where, 'the payload is cut short')
  if (!storedCrcOk(h, stored)) throw err('SNAP_CHECKSUM', where, 'the payload checksum does not match')
  if (h.frames.length) return
  // lz4-napi sizes its output from the prefix: check it before it allocates anything.
  if (h.codec === CODEC_LZ4 && Buffer.from(stored.buffer, stored.byteOffset, 4).readUInt32LE(0) !== h.rawLength) {
    throw err('SNAP_CORRUPT', where, 'the LZ4 length prefix is not raw_length')
  }
}

/**
 * Every stored byte against its checksum: data_crc over the payload, or for a framed cluster
 * data_crc over the frame table and each frame's crc over its bytes (each byte checked once).
 */
export function storedCrcOk(h: ClusterHeader, stored: Uint8Array): boolean {
  if (!h.frames.length) return crc32(stored) === h.dataCrc
  if (frameTableCrc(h.frames) !== h.dataCrc) return false
  for (let i = 0, at = 0; i < h.frames.length / 2; at += h.frames[2 * i], i++) {
    if (crc32(stored.subarray(at, at + h.frames[2 * i])) !== h.frames[2 * i + 1]) return false
  }
  return true
}

function checkDecoded(h: ClusterHeader, raw: Buffer, where: ClusterWhere): Buffer {
  if (raw.length !== h.rawLength) throw err('SNAP_CORRUPT', where, `the payload decodes to ${raw.length} bytes, not ${h.rawLength}`)
  return raw
}

/** Check and decode a payload; LZ4 runs on the libuv pool. Returns the raw pages. */
export async function decodePayload(h: ClusterHeader, stored: Buffer, where: ClusterWhere): Promise<Buffer> {
  checkStored(h, stored, where)
  if (h.codec === CODEC_NONE) return stored
  if (h.frames.length) return decodeFramesAsync(h, stored, where)
  let raw: Buffer
  try {
    raw = await lz4().uncompress(stored)
  } catch (e) {
    throw err('SNAP_CORRUPT', where, `the LZ4 payload does not decode (${(e as Error).message})`)
  }
  return checkDecoded(h, raw, where)
}

/**
 * The same on the calling thread. With `into` (at least raw_length bytes, reused by the caller)
 * an LZ4 payload decodes into it (lz4-block.ts) and a subarray of it comes back: no fresh
 * memory per cluster. Without, lz4-napi allocates the result. With `left` (one entry per frame),
 * a frame stored raw is not copied into the result: left[i] is where its pages are in `stored`
 * (-1 for a frame decoded into the result), for a caller that sends pages from where they lie.
 */
export function decodePayloadSync(h: ClusterHeader, stored: Buffer, where: ClusterWhere, into?: Buffer, left?: Int32Array): Buffer {
  checkStored(h, stored, where)
  if (h.codec === CODEC_NONE) return stored
  if (h.frames.length) return decodeFrames(h, stored, where, into && into.length >= h.rawLength ? into : Buffer.allocUnsafe(h.rawLength), left)
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
    raw = lz4().uncompressSync(stored)
  } catch (e) {
    throw err('SNAP_CORRUPT', where, `the LZ4 payload does not decode (${(e as Error).message})`)
  }
  return checkDecoded(h, raw, where)
}

/** Every frame of a checked payload into `into` (raw_length bytes or more). */
function decodeFrames(h: ClusterHeader, stored: Buffer, where: ClusterWhere, into: Buffer, left?: Int32Array): Buffer {
  let out = 0
  frameLayout(h, h.rawLength / h.pageCount).forEach(({ start, end, rawLength }, i) => {
    const inPlace = left !== undefined && end - start === rawLength
    if (left) left[i] = inPlace ? start : -1
    if (!inPlace) decodeFrameInto(stored.subarray(start, end), rawLength, into.subarray(out), where, i)
    out += rawLength
  })
  return into.subarray(0, h.rawLength)
}

/**
 * The frames on the libuv pool (lz4-napi), all at once, then joined: what multifd's sender uses
 * to decode on the other core. Each prefix is checked before lz4-napi sizes its output by it.
 */
async function decodeFramesAsync(h: ClusterHeader, stored: Buffer, where: ClusterWhere): Promise<Buffer> {
  const frames = frameLayout(h, h.rawLength / h.pageCount).map(({ start, end, rawLength }) => ({ frame: stored.subarray(start, end), raw: rawLength }))
  // Every prefix before any decode starts: a throw here leaves no decode behind.
  frames.forEach(({ frame, raw }, i) => checkFramePrefix(frame, raw, where, i))
  const parts = frames.map(({ frame, raw }, i) =>
    frame.length === raw
      ? frame
      : lz4().uncompress(frame).then(
          (d) => {
            if (d.length !== raw) throw err('SNAP_CORRUPT', where, `frame ${i} decodes to ${d.length} bytes, not ${raw}`)
            return d
          },
          (e) => {
            throw err('SNAP_CORRUPT', where, `frame ${i} does not decode (${(e as Error).message})`)
          },
        ),
  )
  return Buffer.concat(await Promise.all(parts), h.rawLength)
}

function decodeFrameInto(frame: Buffer, rawLength: number, into: Buffer, where: ClusterWhere, i: number): void {
  if (frame.length === rawLength) {
    frame.copy(into, 0)
    return
  }
  checkFramePrefix(frame, rawLength, where, i)
  try {
    decodeLz4Block(frame, 4, frame.length, into, rawLength)
  } catch (e) {
    if (!(e instanceof Lz4Error)) throw e
    throw err('SNAP_CORRUPT', where, `frame ${i} does not decode (${e.message})`)
  }
}

/**
 * One frame of a framed cluster, read alone (a page request): its crc checked, decoded into
 * `into` (at least its raw length). The header (and with it the frame table) was checked.
 */
export function decodeFrameSync(h: ClusterHeader, i: number, frame: Buffer, where: ClusterWhere, into: Buffer): Buffer {
  const { start, end, rawLength } = frameExtent(h, i, h.rawLength / h.pageCount)
  if (frame.length !== end - start) throw err('SNAP_CORRUPT', where, `frame ${i} is cut short`)
  if (crc32(frame) !== h.frames[2 * i + 1]) throw err('SNAP_CHECKSUM', where, `frame ${i}'s checksum does not match`)
  decodeFrameInto(frame, rawLength, into, where, i)
  return into.subarray(0, rawLength)
}

/**
 * Compress raw pages as frames of `framePages` pages (codec 1, flags bit 0) into `out` (at least
 * raw.length bytes: no frame is stored longer than its pages), each frame's crc taken there.
 * Null when the whole would not save one eighth of raw_length: the cluster is then stored raw.
 */
export function encodeFrames(raw: Buffer, pageSize: number, framePages: number, out: Buffer): { stored: Buffer; frames: Uint32Array } | null {
  if (out.length < raw.length) throw new RangeError('encodeFrames: out is shorter than the raw pages')
  const size = framePages * pageSize
  const n = Math.ceil(raw.length / size)
  const frames = new Uint32Array(2 * n)
  let at = 0
  for (let i = 0; i < n; i++) {
    const part = raw.subarray(i * size, Math.min(raw.length, (i + 1) * size))
    // LZ4 only when shorter than the pages, else the pages as they are.
    let len = compressLz4Into(part, out.subarray(at, at + part.length - 1))
    if (len === 0) {
      part.copy(out, at)
      len = part.length
    }
    frames[2 * i] = len
    frames[2 * i + 1] = crc32(out.subarray(at, at + len))
    at += len
  }
  if (at > maxLz4Stored(raw.length) - 4) return null
  return { stored: out.subarray(0, at), frames }
}

/**
 * encodeFrames on a libuv pool thread (native/lz4 encodeFramesAsync): the same bytes, while the
 * caller goes on. `raw` and `out` must not change until it settles. Without the addon it is
 * encodeFrames, at once.
 */
export async function encodeFramesAsync(raw: Buffer, pageSize: number, framePages: number, out: Buffer): Promise<{ stored: Buffer; frames: Uint32Array } | null> {
  const lib = nativeLz4()
  if (!lib) return encodeFrames(raw, pageSize, framePages, out)
  if (out.length < raw.length) throw new RangeError('encodeFramesAsync: out is shorter than the raw pages')
  const frames = new Uint32Array(2 * Math.ceil(raw.length / (framePages * pageSize)))
  const at = await lib.encodeFramesAsync(raw, out, framePages * pageSize, frames)
  if (at > maxLz4Stored(raw.length) - 4) return null
  return { stored: out.subarray(0, at), frames }
}

/**
 * Decode a whole cluster held in `buf` (header block, payload and padding: exactly its
 * extent). Checks that the extent matches the header.
 */
export function splitCluster(buf: Buffer, where: ClusterWhere, lim: ClusterLimits): { header: ClusterHeader; stored: Buffer } {
  const header = decodeClusterHeader(buf, 0, where, lim)
  const frames = header.frames.length / 2
  const extent = clusterExtent(header.pageCount, header.storedLength, frames)
  if (extent !== buf.length) {
    throw err('SNAP_CORRUPT', where, `the cluster takes ${extent} bytes but the next one starts ${buf.length} bytes on`)
  }
  const start = clusterHeaderBlock(header.pageCount, frames)
  return { header, stored: buf.subarray(start, start + header.storedLength) }
}
