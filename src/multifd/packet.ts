// The two fixed structures of a QEMU multifd channel (reference §4.2-§4.4; qemu-multifd-peer.md
// §2-§4): the 64-byte initial packet (MultiFDInit_t) that opens every channel, and the
// 1344-byte RAM packet header (MultiFDPacket_t) before each packet's pages. Integers are big
// endian. Decoders check everything QEMU's destination checks, and a little more (offsets
// page-aligned), before a caller touches a page.

import { SnapError } from '../errors.js'
import {
  MULTIFD_FLAG_COMPRESSION_MASK, MULTIFD_FLAG_DEVICE_STATE, MULTIFD_FLAG_SYNC, MULTIFD_INIT_SIZE, MULTIFD_MAGIC,
  MULTIFD_PACKET_FIXED, MULTIFD_PACKET_HEADER_SIZE, MULTIFD_PACKET_SIZE, MULTIFD_PAGE_COUNT, MULTIFD_RAMBLOCK_NAME,
  MULTIFD_VERSION, TARGET_PAGE_SIZE,
} from '../stream/constants.js'

/** MultiFDInit_t. */
export interface MultifdInit {
  /** the VM's uuid (`-uuid`), 16 raw bytes; all zero when the VM has none */
  uuid: Buffer
  /** the channel number, 0 … N-1 */
  id: number
}

/** MultiFDPacket_t (nocomp). `offsets`: the normal pages' byte offsets in payload order, then the zero pages'. */
export interface MultifdPacketHeader {
  flags: number
  pagesAlloc: number
  normalPages: number
  nextPacketSize: number
  packetNum: bigint
  zeroPages: number
  /** the RAM block's idstr; empty in a SYNC packet */
  ramblock: string
  offsets: number[]
}

export const isSync = (h: MultifdPacketHeader): boolean => (h.flags & MULTIFD_FLAG_SYNC) !== 0

/** True when `b` starts like a multifd channel (its first 4 bytes), for telling connections apart. */
export const looksMultifd = (b: Uint8Array): boolean => b.length >= 4 && b[0] === 0x11 && b[1] === 0x22 && b[2] === 0x33 && b[3] === 0x44

export function encodeInit(init: MultifdInit): Buffer {
  if (init.uuid.length !== 16) throw new SnapError('SNAP_INTERNAL', `a uuid of ${init.uuid.length} bytes`)
  if (!(Number.isInteger(init.id) && init.id >= 0 && init.id < 256)) throw new SnapError('SNAP_INTERNAL', `channel id ${init.id}`)
  const b = Buffer.alloc(MULTIFD_INIT_SIZE)
  b.writeUInt32BE(MULTIFD_MAGIC, 0)
  b.writeUInt32BE(MULTIFD_VERSION, 4)
  init.uuid.copy(b, 8)
  b[24] = init.id
  return b
}

function checkMagic(b: Buffer, what: string): void {
  const magic = b.readUInt32BE(0)
  if (magic !== MULTIFD_MAGIC) {
    throw new SnapError('SNAP_MULTIFD_BAD_MAGIC', `${what}: magic 0x${magic.toString(16).padStart(8, '0')}, expected 0x11223344 (is this a QEMU multifd channel?)`)
  }
  const version = b.readUInt32BE(4)
  if (version !== MULTIFD_VERSION) throw new SnapError('SNAP_MULTIFD_BAD_MAGIC', `${what}: version ${version}, only version 1 is known`)
}

export function decodeInit(b: Buffer): MultifdInit {
  if (b.length < MULTIFD_INIT_SIZE) throw new SnapError('SNAP_MULTIFD_TRUNCATED', `a multifd initial packet of ${b.length} bytes (64 expected)`)
  checkMagic(b, 'multifd initial packet')
  // The reserved bytes (25-63) are not checked: QEMU does not check them either.
  return { uuid: Buffer.from(b.subarray(8, 24)), id: b[24] }
}

export function encodePacketHeader(h: Omit<MultifdPacketHeader, 'nextPacketSize'> & { nextPacketSize?: number }): Buffer {
  const name = Buffer.from(h.ramblock, 'latin1')
  if (name.length >= MULTIFD_RAMBLOCK_NAME) throw new SnapError('SNAP_INTERNAL', `RAM block name of ${name.length} bytes`)
  if (h.offsets.length !== h.normalPages + h.zeroPages || h.offsets.length > MULTIFD_PAGE_COUNT || h.pagesAlloc > MULTIFD_PAGE_COUNT) {
    throw new SnapError('SNAP_INTERNAL', `a multifd packet of ${h.normalPages}+${h.zeroPages} pages (${h.offsets.length} offsets, ${h.pagesAlloc} allocated)`)
  }
  const b = Buffer.alloc(MULTIFD_PACKET_HEADER_SIZE)
  b.writeUInt32BE(MULTIFD_MAGIC, 0)
  b.writeUInt32BE(MULTIFD_VERSION, 4)
  b.writeUInt32BE(h.flags, 8)
  b.writeUInt32BE(h.pagesAlloc, 12)
  b.writeUInt32BE(h.normalPages, 16)
  b.writeUInt32BE(h.nextPacketSize ?? h.normalPages * TARGET_PAGE_SIZE, 20)
  b.writeBigUInt64BE(h.packetNum, 24)
  b.writeUInt32BE(h.zeroPages, 32)
  name.copy(b, 64)
  for (let i = 0; i < h.offsets.length; i++) {
    const o = h.offsets[i]
    b.writeUInt32BE(Math.floor(o / 2 ** 32), MULTIFD_PACKET_FIXED + 8 * i)
    b.writeUInt32BE(o >>> 0, MULTIFD_PACKET_FIXED + 8 * i + 4)
  }
  return b
}

/**
 * The first 12 bytes (magic, version, flags), checked alone as QEMU does: a device-state
 * packet (flag 0x40) has another header length, so it is refused before more is read.
 */
export function checkPacketStart(b: Buffer): number {
  checkMagic(b, 'multifd packet')
  const flags = b.readUInt32BE(8)
  if (flags & MULTIFD_FLAG_DEVICE_STATE) throw new SnapError('SNAP_STREAM_UNSUPPORTED', 'a multifd device-state packet (VFIO multifd transfer) is not supported')
  if (flags & MULTIFD_FLAG_COMPRESSION_MASK) {
    throw new SnapError('SNAP_STREAM_UNSUPPORTED', `multifd compression (flags 0x${flags.toString(16)}) is not supported: set multifd-compression none`)
  }
  if (flags & ~MULTIFD_FLAG_SYNC) throw new SnapError('SNAP_MULTIFD_CORRUPT', `multifd packet with unknown flags 0x${flags.toString(16)}`)
  return flags
}

/** Decodes and checks a RAM packet header (offsets against their block are the caller's: it knows the blocks). */
export function decodePacketHeader(b: Buffer): MultifdPacketHeader {
  if (b.length < MULTIFD_PACKET_HEADER_SIZE) throw new SnapError('SNAP_MULTIFD_TRUNCATED', `a multifd packet header of ${b.length} bytes (1344 expected)`)
  const flags = checkPacketStart(b)
  const pagesAlloc = b.readUInt32BE(12)
  const normalPages = b.readUInt32BE(16)
  const nextPacketSize = b.readUInt32BE(20)
  const zeroPages = b.readUInt32BE(32)
  if (pagesAlloc > MULTIFD_PAGE_COUNT) throw new SnapError('SNAP_MULTIFD_TOO_LARGE', `multifd packet with pages_alloc ${pagesAlloc} (at most ${MULTIFD_PAGE_COUNT})`)
  // nocomp ignores next_packet_size, but a length this large is garbage however it is read.
  if (nextPacketSize > MULTIFD_PACKET_SIZE) throw new SnapError('SNAP_MULTIFD_TOO_LARGE', `multifd packet with next_packet_size ${nextPacketSize} (at most ${MULTIFD_PACKET_SIZE})`)
  // QEMU 10.0 writes pages_alloc 0 in a SYNC packet; older ones 128. Counts are checked against it.
  if (normalPages > pagesAlloc || zeroPages > pagesAlloc - normalPages) {
    throw new SnapError('SNAP_MULTIFD_CORRUPT', `multifd packet with ${normalPages} normal and ${zeroPages} zero pages in room for ${pagesAlloc}`)
  }
  const count = normalPages + zeroPages
  let ramblock = ''
  if (count > 0) {
    const nameBytes = b.subarray(64, 64 + MULTIFD_RAMBLOCK_NAME - 1) // QEMU forces the last byte to NUL
    const nul = nameBytes.indexOf(0)
    ramblock = nameBytes.toString('latin1', 0, nul < 0 ? nameBytes.length : nul)
  }
  const offsets = new Array<number>(count)
  for (let i = 0; i < count; i++) {
    const at = MULTIFD_PACKET_FIXED + 8 * i
    const hi = b.readUInt32BE(at)
    const lo = b.readUInt32BE(at + 4)
    if (hi >= 0x200000) throw new SnapError('SNAP_MULTIFD_BAD_PAGE', `multifd page offset 0x${b.readBigUInt64BE(at).toString(16)} in block ${ramblock}`)
    offsets[i] = hi * 2 ** 32 + lo
  }
  return { flags, pagesAlloc, normalPages, nextPacketSize, packetNum: b.readBigUInt64BE(24), zeroPages, ramblock, offsets }
}
