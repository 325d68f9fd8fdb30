// The image header: format-spec/container.md, "Header" and "Reading an image" step 2.
import { crc32 } from 'node:zlib'
import { Reader, Writer, isAllZero } from '../bytes.js'
import { SnapError } from '../errors.js'

export const HEADER_MAGIC = Buffer.from([0x53, 0x4e, 0x41, 0x50, 0x43, 0x54, 0x4c, 0x1a])
/** The header block: bytes 0..4095 of the file. */
export const HEADER_SIZE = 4096
export const HEADER_LENGTH_V1 = 192
export const FORMAT_VERSION = 1
export const PAGE_SIZE = 4096
/** Clusters, the trailer and the file length are multiples of this. */
export const ALIGN = 4096
export const MIN_CLUSTER_SIZE = 65536
export const MAX_CLUSTER_SIZE = 64 * 1024 * 1024
export const DEFAULT_CLUSTER_SIZE = 1024 * 1024
export const MAX_MACHINE_LENGTH = 62

export const INCOMPAT_BASE_IMAGE = 1n << 0n
export const INCOMPAT_ENCRYPTED = 1n << 1n
export const INCOMPAT_HUGE_PAGES = 1n << 2n
export const INCOMPAT_FRAMED = 1n << 3n
/** the page map may hold shared runs (container.md "Shared slots") */
export const INCOMPAT_SHARED_SLOTS = 1n << 4n
/** Incompatible bits this version can open: base_image (an incremental image), framed_clusters. */
export const SUPPORTED_INCOMPATIBLE = INCOMPAT_BASE_IMAGE | INCOMPAT_FRAMED | INCOMPAT_SHARED_SLOTS
export const COMPAT_XBZRLE_SOURCE = 1n << 0n

export interface ImageHeader {
  version: number
  headerLength: number
  incompatibleFeatures: bigint
  compatibleFeatures: bigint
  autoclearFeatures: bigint
  clusterSize: number
  pageSize: number
  uuid: Buffer
  creationTime: number
  generation: number
  trailerOffset: number
  trailerLength: number
  fileLength: number
  machine: string
  baseImageOffset: number
  encryptionMethod: number
}

export function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0
}

/** Encode a version-1 header into a zeroed 4096-byte block. */
export function encodeHeader(h: ImageHeader): Buffer {
  const machine = Buffer.from(h.machine, 'latin1').subarray(0, MAX_MACHINE_LENGTH)
  const w = new Writer(Buffer.alloc(HEADER_SIZE))
  w.bytes(HEADER_MAGIC).u32(FORMAT_VERSION).u32(HEADER_LENGTH_V1)
  w.buf.writeBigUInt64BE(h.incompatibleFeatures, 16)
  w.buf.writeBigUInt64BE(h.compatibleFeatures, 24)
  w.buf.writeBigUInt64BE(h.autoclearFeatures, 32)
  w.pos = 40
  w.u32(h.clusterSize).u32(h.pageSize).bytes(h.uuid.subarray(0, 16))
  w.u64(h.creationTime).u64(h.generation).u64(h.trailerOffset).u64(h.trailerLength).u64(h.fileLength)
  w.u16(machine.length).bytes(machine)
  w.pos = 168
  w.u64(h.baseImageOffset).u32(h.encryptionMethod).zeros(8)
  w.u32(crc32(w.buf.subarray(0, HEADER_LENGTH_V1 - 4)))
  return w.buf
}

const fail = (code: 'SNAP_CORRUPT' | 'SNAP_TRUNCATED' | 'SNAP_BAD_MAGIC', msg: string): never => {
  throw new SnapError(code, msg, { offset: 0 })
}

/**
 * Decode and check the header (steps 1 and 2). `buf` holds the first bytes of the file (up to
 * 4096), `fileSize` is the file's length.
 */
export function decodeHeader(buf: Buffer, fileSize: number): ImageHeader {
  // A create that died leaves a zero header (writing an image, step 1).
  if (buf.length >= HEADER_SIZE && isAllZero(buf.subarray(0, HEADER_SIZE))) {
    throw new SnapError('SNAP_INCOMPLETE', 'the image was never finished (its header is zero): a create died or is still running', { offset: 0 })
  }
  const magicOk = buf.length >= 8 && buf.subarray(0, 8).equals(HEADER_MAGIC)
  if (!magicOk) fail('SNAP_BAD_MAGIC', 'not a snapctl image (bad magic)')
  if (fileSize < 2 * ALIGN || buf.length < HEADER_SIZE) fail('SNAP_TRUNCATED', `the file is ${fileSize} bytes, shorter than any image`)
  const r = new Reader(buf, 8, HEADER_SIZE, 'SNAP_CORRUPT')
  const version = r.u32('version')
  if (version !== FORMAT_VERSION) {
    throw new SnapError('SNAP_UNSUPPORTED_VERSION', `image format version ${version}; this snapctl reads version ${FORMAT_VERSION}`, { offset: 8 })
  }
  const headerLength = r.u32('header_length')
  if (headerLength < HEADER_LENGTH_V1 || headerLength > HEADER_SIZE) fail('SNAP_CORRUPT', `header_length ${headerLength} is out of range`)
  if (buf.readUInt32BE(headerLength - 4) !== crc32(buf.subarray(0, headerLength - 4))) {
    throw new SnapError('SNAP_CHECKSUM', 'the header checksum does not match: the header is damaged', { offset: 0 })
  }
  const incompatibleFeatures = buf.readBigUInt64BE(16)
  const unknown = incompatibleFeatures & ~SUPPORTED_INCOMPATIBLE
  if (unknown !== 0n) {
    throw new SnapError('SNAP_UNSUPPORTED_FEATURE', `the image uses incompatible features 0x${unknown.toString(16)} this snapctl does not support`, { offset: 16 })
  }
  r.pos = 40
  const h: ImageHeader = {
    version,
    headerLength,
    incompatibleFeatures,
    compatibleFeatures: buf.readBigUInt64BE(24),
    autoclearFeatures: buf.readBigUInt64BE(32),
    clusterSize: r.u32('cluster_size'),
    pageSize: r.u32('page_size'),
    uuid: Buffer.from(r.bytes(16, 'uuid')),
    creationTime: r.u64('creation_time', 'SNAP_CORRUPT'),
    generation: r.u64('generation', 'SNAP_CORRUPT'),
    trailerOffset: r.u64('trailer_offset', 'SNAP_CORRUPT'),
    trailerLength: r.u64('trailer_length', 'SNAP_CORRUPT'),
    fileLength: r.u64('file_length', 'SNAP_CORRUPT'),
    machine: '',
    baseImageOffset: 0,
    encryptionMethod: 0,
  }
  const machineLength = r.u16('machine_length')
  if (!isPowerOfTwo(h.clusterSize) || h.clusterSize < MIN_CLUSTER_SIZE || h.clusterSize > MAX_CLUSTER_SIZE) {
    fail('SNAP_CORRUPT', `cluster_size ${h.clusterSize} is not a power of two between 64 KiB and 64 MiB`)
  }
  if (h.pageSize !== PAGE_SIZE) fail('SNAP_CORRUPT', `page_size ${h.pageSize} is not ${PAGE_SIZE}`)
  if (machineLength > MAX_MACHINE_LENGTH) fail('SNAP_CORRUPT', `machine_length ${machineLength} is over ${MAX_MACHINE_LENGTH}`)
  h.machine = buf.subarray(106, 106 + machineLength).toString('latin1')
  r.pos = 168
  h.baseImageOffset = r.u64('base_image_offset', 'SNAP_CORRUPT')
  h.encryptionMethod = r.u32('encryption_method')
  const hasBase = (incompatibleFeatures & INCOMPAT_BASE_IMAGE) !== 0n
  if (hasBase !== (h.baseImageOffset !== 0) || h.encryptionMethod !== 0) fail('SNAP_CORRUPT', 'base_image_offset or encryption_method set without their feature bit (or bit 0 without base_image_offset)')
  if (h.fileLength % ALIGN !== 0) fail('SNAP_CORRUPT', `file_length ${h.fileLength} is not a multiple of ${ALIGN}`)
  if (fileSize < h.fileLength) fail('SNAP_TRUNCATED', `the file is ${fileSize} bytes, its header says ${h.fileLength}: the image was cut short`)
  if (fileSize > h.fileLength) fail('SNAP_CORRUPT', `the file is ${fileSize} bytes, its header says ${h.fileLength}`)
  return h
}
