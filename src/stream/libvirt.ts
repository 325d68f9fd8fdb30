// libvirt save image header (`virsh save`, managedsave; reference §7, libvirt
// src/qemu/qemu_saveimage.h). 92 bytes in the saving host's byte order, then data_len bytes of
// domain XML, optional cookie XML and zero padding; the QEMU stream starts at 92 + data_len.

import { SnapError } from '../errors.js'
import {
  QEMU_SAVE_FORMAT_NAMES,
  QEMU_SAVE_HEADER_SIZE,
  QEMU_SAVE_MAGIC,
  QEMU_SAVE_PARTIAL,
  QEMU_SAVE_VERSION,
  QEMU_SAVE_FORMAT_SPARSE,
} from './constants.js'

/** XML + cookie + padding beyond this is taken as a corrupt header (libvirt pads by 64 KiB). */
export const MAX_LIBVIRT_DATA_LEN = 64 * 1024 * 1024

export interface LibvirtHeader {
  /** where the QEMU stream starts: 92 + data_len */
  streamOffset: number
  wasRunning: boolean
  /** 0 = raw QEMU stream; 6 = sparse (mapped-ram), accepted with sparseOk only */
  format: number
  version: number
  /** the domain XML (up to its NUL) */
  xml: string
  cookie: string | null
  /** the 92-byte header and the data_len bytes after it, kept verbatim for the image */
  header: Buffer
}

interface Fixed {
  version: number
  dataLen: number
  wasRunning: number
  format: number
  cookieOffset: number
}

const MAGIC = Buffer.from(QEMU_SAVE_MAGIC, 'latin1')
const PARTIAL = Buffer.from(QEMU_SAVE_PARTIAL, 'latin1')

const FORMAT_HINT: Record<string, string> = {
  gzip: 'gzip -dc', bzip2: 'bzip2 -dc', xz: 'xz -dc', lzop: 'lzop -dc', zstd: 'zstd -dc',
}

/** The fixed 92 bytes, checked; null when `head` does not start with libvirt's magic. */
function readFixed(head: Buffer, sparseOk = false): Fixed | null {
  if (head.length < MAGIC.length) return null
  const magic = head.subarray(0, MAGIC.length)
  if (magic.equals(PARTIAL)) {
    throw new SnapError('SNAP_LIBVIRT_INCOMPLETE', 'libvirt save image is incomplete (magic LibvirtQemudPart): the save did not finish')
  }
  if (!magic.equals(MAGIC)) return null
  if (head.length < QEMU_SAVE_HEADER_SIZE) {
    throw new SnapError('SNAP_STREAM_TRUNCATED', `libvirt save image header: needs ${QEMU_SAVE_HEADER_SIZE} bytes, ${head.length} there`)
  }
  let le = true
  let version = head.readUInt32LE(16)
  if (version > QEMU_SAVE_VERSION) {
    // written by a host of the other byte order
    le = false
    version = head.readUInt32BE(16)
  }
  if (version > QEMU_SAVE_VERSION || version === 0) {
    throw new SnapError('SNAP_STREAM_UNSUPPORTED', `libvirt save image version ${version} is not supported`)
  }
  const u32 = (at: number): number => (le ? head.readUInt32LE(at) : head.readUInt32BE(at))
  const f: Fixed = { version, dataLen: u32(20), wasRunning: u32(24), format: u32(28), cookieOffset: u32(32) }
  if (f.dataLen === 0 || f.dataLen > MAX_LIBVIRT_DATA_LEN) {
    throw new SnapError(f.dataLen === 0 ? 'SNAP_STREAM_CORRUPT' : 'SNAP_STREAM_TOO_LARGE', `libvirt save image: XML data length ${f.dataLen}`)
  }
  if (f.cookieOffset >= f.dataLen) throw new SnapError('SNAP_STREAM_CORRUPT', `libvirt save image: cookie offset ${f.cookieOffset} past the XML data`)
  if (version === 1) f.format = 0 // version 1 images were never compressed
  if (f.format !== 0 && !(sparseOk && f.format === QEMU_SAVE_FORMAT_SPARSE)) {
    const name = QEMU_SAVE_FORMAT_NAMES[f.format] as string | undefined
    const how = name === undefined ? `unknown format ${f.format}`
      : name === 'sparse' ? 'sparse libvirt save image whose QEMU stream is not a mapped-ram stream'
      : `${name}-compressed libvirt save image: decompress it first (tail -c +${QEMU_SAVE_HEADER_SIZE + f.dataLen + 1} FILE | ${FORMAT_HINT[name]})`
    throw new SnapError('SNAP_STREAM_UNSUPPORTED', name === undefined ? `libvirt save image of ${how}` : how)
  }
  return f
}

export interface LibvirtReadOptions {
  /** accept format 6 (sparse: a mapped-ram stream, src/stream/mapped-ram.ts) */
  sparseOk?: boolean
}

/**
 * From at least the first 92 bytes (fewer when they already rule libvirt out): the length of the
 * whole libvirt header (92 + data_len), or null when this is not a libvirt save image.
 */
export function libvirtHeaderLength(head: Buffer, opts: LibvirtReadOptions = {}): number | null {
  const f = readFixed(head, opts.sparseOk)
  return f === null ? null : QEMU_SAVE_HEADER_SIZE + f.dataLen
}

/** Parse a libvirt header from the start of `buf` (which must hold all of it); null if not libvirt. */
export function parseLibvirtHeader(buf: Buffer, opts: LibvirtReadOptions = {}): LibvirtHeader | null {
  const f = readFixed(buf, opts.sparseOk)
  if (f === null) return null
  const total = QEMU_SAVE_HEADER_SIZE + f.dataLen
  if (buf.length < total) {
    throw new SnapError('SNAP_STREAM_TRUNCATED', `libvirt save image header: needs ${total} bytes, ${buf.length} there`)
  }
  const cstr = (from: number, to: number): string => {
    const nul = buf.indexOf(0, from)
    return buf.toString('utf8', from, nul < 0 || nul > to ? to : nul)
  }
  const xmlEnd = QEMU_SAVE_HEADER_SIZE + (f.cookieOffset || f.dataLen)
  return {
    streamOffset: total,
    wasRunning: f.wasRunning !== 0,
    format: f.format,
    version: f.version,
    xml: cstr(QEMU_SAVE_HEADER_SIZE, xmlEnd),
    cookie: f.cookieOffset ? cstr(xmlEnd, total) : null,
    header: Buffer.from(buf.subarray(0, total)),
  }
}

export interface MakeLibvirtHeaderOptions {
  wasRunning?: boolean
  format?: number
  cookie?: string
  /** zero bytes after the XML (and cookie); libvirt reserves 64 KiB */
  padding?: number
  /** write the LibvirtQemudPart magic of a save in progress */
  partial?: boolean
  /** write the integers big-endian, as a big-endian host would */
  bigEndian?: boolean
  version?: number
}

/** A libvirt save image header for tests and fixtures; the QEMU stream goes right after it. */
export function makeLibvirtHeader(xml: string, opts: MakeLibvirtHeaderOptions = {}): Buffer {
  const x = Buffer.from(xml + '\0', 'utf8')
  const c = opts.cookie === undefined ? Buffer.alloc(0) : Buffer.from(opts.cookie + '\0', 'utf8')
  const dataLen = x.length + c.length + (opts.padding ?? 0)
  const out = Buffer.alloc(QEMU_SAVE_HEADER_SIZE + dataLen)
  ;(opts.partial ? PARTIAL : MAGIC).copy(out, 0)
  const put = (at: number, v: number): void => {
    if (opts.bigEndian) out.writeUInt32BE(v, at)
    else out.writeUInt32LE(v, at)
  }
  put(16, opts.version ?? QEMU_SAVE_VERSION)
  put(20, dataLen)
  put(24, opts.wasRunning ? 1 : 0)
  put(28, opts.format ?? 0)
  put(32, c.length ? x.length : 0)
  x.copy(out, QEMU_SAVE_HEADER_SIZE)
  c.copy(out, QEMU_SAVE_HEADER_SIZE + x.length)
  return out
}
