// QEMU's mapped-ram file (reference §3; QEMU migration/ram.c: MappedRamHeader,
// mapped_ram_setup_ramblock, parse_ramblock_mapped_ram, ram_save_file_bmap). A `migrate file:`
// with capability mapped-ram writes an ordinary stream whose MEM_SIZE list carries, after each
// block's used_length, a 28-byte header naming two absolute file offsets: the block's bitmap
// (one bit a page, host-order u64 words: LE, bit i%8 of byte i/8) and its page array (page i at
// pages_offset + i × page_size, 1 MiB aligned). The stream goes on after the page array. Pages
// with a clear bit are zero at the source and are never written (holes).
//
// Here: the header's codec, the layout a writer makes, the bitmap's bits, and the decoder of a
// whole file (optionally behind a libvirt header, format sparse). The decoder never trusts the
// file: every region is checked against the file's size and must lie after what was read
// before it, so that a hostile file cannot make it read backwards, loop or allocate without bound.

import { Reader, Writer, roundUp } from '../bytes.js'
import { SnapError } from '../errors.js'
import type { RamBlockDecl } from '../types.js'
import * as C from './constants.js'
import { decodeConfiguration } from './configuration.js'
import { libvirtHeaderLength, parseLibvirtHeader, type LibvirtHeader } from './libvirt.js'

const PAGE = C.TARGET_PAGE_SIZE
const MAX_BLOCKS = 1024
/** 16 TiB of guest RAM, as the stream parser's bound */
const MAX_RAM = 2 ** 44
/** a block entry in the MEM_SIZE list: str8 name, used_length, MappedRamHeader */
const MAX_ENTRY = 1 + 255 + 8 + C.MAPPED_RAM_HEADER_SIZE
/** bytes read for the file header, configuration and START section header */
const HEAD_READ = 64 * 1024

/** §3.2 MappedRamHeader. */
export interface MappedRamHeader {
  version: number
  pageSize: number
  bitmapOffset: number
  pagesOffset: number
}

export function encodeMappedRamHeader(h: MappedRamHeader): Buffer {
  return Writer.alloc(C.MAPPED_RAM_HEADER_SIZE).u32(h.version).u64(h.pageSize).u64(h.bitmapOffset).u64(h.pagesOffset).done()
}

export function decodeMappedRamHeader(r: Reader): MappedRamHeader {
  const what = 'a mapped-ram block header'
  return {
    version: r.u32(what),
    pageSize: r.u64(what, 'SNAP_STREAM_TOO_LARGE'),
    bitmapOffset: r.u64(what, 'SNAP_MAPPED_RAM_BOUNDS'),
    pagesOffset: r.u64(what, 'SNAP_MAPPED_RAM_BOUNDS'),
  }
}

/** A block of a mapped-ram file: where its bitmap and pages are. */
export interface MappedRamBlock extends RamBlockDecl {
  bitmapOffset: number
  pagesOffset: number
}

/** ceil(pages / 64) host longs (QEMU: BITS_TO_LONGS(num_pages) * sizeof(unsigned long)). */
export const bitmapSize = (pages: number): number => Math.ceil(pages / 64) * 8

export const bitIsSet = (bitmap: Uint8Array, i: number): boolean => (bitmap[i >>> 3] & (1 << (i & 7))) !== 0

export function setBit(bitmap: Uint8Array, i: number): void {
  bitmap[i >>> 3] |= 1 << (i & 7)
}

/** Calls fn for each run of equal bits over the first `pages` bits. */
export function forEachRun(bitmap: Uint8Array, pages: number, fn: (first: number, count: number, set: boolean) => void): void {
  let i = 0
  while (i < pages) {
    const set = bitIsSet(bitmap, i)
    let j = i + 1
    while (j < pages) {
      // whole bytes of the same value at once
      if ((j & 7) === 0 && j + 8 <= pages && bitmap[j >>> 3] === (set ? 0xff : 0)) j += 8
      else if (bitIsSet(bitmap, j) === set) j++
      else break
    }
    fn(i, j - i, set)
    i = j
  }
}

/** The entry of one block in the MEM_SIZE list: str8 name, BE u64 used_length, the header. */
export function blockEntry(b: MappedRamBlock): Buffer {
  const w = Writer.alloc(1 + Buffer.byteLength(b.name, 'latin1') + 8 + C.MAPPED_RAM_HEADER_SIZE)
  w.str8(b.name).u64(b.size)
  w.bytes(encodeMappedRamHeader({ version: C.MAPPED_RAM_HDR_VERSION, pageSize: PAGE, bitmapOffset: b.bitmapOffset, pagesOffset: b.pagesOffset }))
  return w.done()
}

/**
 * Where QEMU puts each block when its entry starts at file offset `at` (mapped_ram_setup_ramblock):
 * the bitmap right after the header, the pages at the next 1 MiB boundary after the bitmap, the
 * next entry right after the pages. Returns the blocks and the offset after the last page array.
 * (`align` other than 1 MiB only for compact test files: QEMU's loader requires page alignment only.)
 */
export function planMappedRam(blocks: RamBlockDecl[], at: number, align: number = C.MAPPED_RAM_FILE_OFFSET_ALIGNMENT): { blocks: MappedRamBlock[]; end: number } {
  const out: MappedRamBlock[] = []
  for (const b of blocks) {
    const bitmapOffset = at + 1 + Buffer.byteLength(b.name, 'latin1') + 8 + C.MAPPED_RAM_HEADER_SIZE
    const pagesOffset = roundUp(bitmapOffset + bitmapSize(b.size / PAGE), align)
    out.push({ name: b.name, size: b.size, bitmapOffset, pagesOffset })
    at = pagesOffset + b.size
  }
  return { blocks: out, end: at }
}

/** Positional reads over a file of known size; short only at the end of the file. */
export interface RandomAccess {
  readonly size: number
  read(pos: number, len: number): Promise<Buffer>
}

/** What a mapped-ram file holds apart from its pages. */
export interface MappedRamFile {
  /** the libvirt header in front (format sparse), or null */
  libvirt: LibvirtHeader | null
  /** file offset of the QEVM magic */
  streamOffset: number
  machine: string
  /** the configuration element as in the file (naming mapped-ram) */
  config: Buffer
  ram: { sectionId: number; instanceId: number; version: number }
  blocks: MappedRamBlock[]
  /** file offset just after the ram START section's footer: the rest is an ordinary stream */
  tailOffset: number
}

/**
 * Decodes a mapped-ram file's structure. Returns null when the file is not a mapped-ram stream
 * (no QEVM magic after an optional libvirt header, or a configuration without the capability):
 * the caller then reads it as an ordinary stream, whose parser says what is wrong with it.
 */
export async function decodeMappedRamFile(src: RandomAccess): Promise<MappedRamFile | null> {
  let head = await src.read(0, HEAD_READ)
  let libvirt: LibvirtHeader | null = null
  let streamOffset = 0
  if (head.length >= C.QEMU_SAVE_HEADER_SIZE) {
    let total: number | null
    try {
      total = libvirtHeaderLength(head, { sparseOk: true })
    } catch {
      return null // not one libvirt header we take: the stream path reports it
    }
    if (total !== null) {
      if (total > src.size) return null
      libvirt = parseLibvirtHeader(await src.read(0, total), { sparseOk: true })
      streamOffset = total
      head = await src.read(streamOffset, HEAD_READ)
    }
  }
  const r = new Reader(head, 0, head.length, 'SNAP_STREAM_TRUNCATED', streamOffset)
  if (r.left < 9 || head.readUInt32BE(0) !== C.QEMU_VM_FILE_MAGIC || head.readUInt32BE(4) !== C.QEMU_VM_FILE_VERSION) return null
  r.pos = 8
  let cfg
  try {
    cfg = decodeConfiguration(r)
  } catch {
    return null
  }
  if (!cfg.capabilities.includes(C.MAPPED_RAM_CAPABILITY)) return null
  if (cfg.capabilities.some((c) => c !== C.MAPPED_RAM_CAPABILITY)) {
    throw new SnapError('SNAP_STREAM_UNSUPPORTED', `mapped-ram file with capabilities ${cfg.capabilities.join(', ')}: only mapped-ram is supported`)
  }
  if (cfg.targetPageBits !== undefined && cfg.targetPageBits !== C.TARGET_PAGE_BITS) {
    throw new SnapError('SNAP_STREAM_UNSUPPORTED', `target page size 2^${cfg.targetPageBits}: only 4096-byte target pages are supported`)
  }
  const config = Buffer.from(head.subarray(8, r.pos))
  const ram = decodeStartHeader(r)
  const word = r.u64('the MEM_SIZE record', 'SNAP_STREAM_TOO_LARGE')
  if (word % PAGE !== C.RAM_SAVE_FLAG_MEM_SIZE) throw new SnapError('SNAP_STREAM_CORRUPT', `the ram START section begins with record flags 0x${(word % PAGE).toString(16)}, not MEM_SIZE`)
  const total = word - C.RAM_SAVE_FLAG_MEM_SIZE
  if (total === 0 || total > MAX_RAM) throw new SnapError(total === 0 ? 'SNAP_STREAM_CORRUPT' : 'SNAP_STREAM_TOO_LARGE', `MEM_SIZE total of ${total} bytes`)
  const { blocks, end } = await decodeBlocks(src, streamOffset + r.pos, total)
  const tailOffset = await skipStartEnd(src, end, ram.sectionId)
  return { libvirt, streamOffset, machine: cfg.machine, config, ram, blocks, tailOffset }
}

function decodeStartHeader(r: Reader): MappedRamFile['ram'] {
  const at = r.baseOffset + r.pos
  if (r.u8('the ram START section') !== C.QEMU_VM_SECTION_START) {
    throw new SnapError('SNAP_STREAM_UNSUPPORTED', 'mapped-ram file: the configuration is not followed by the ram START section', { offset: at })
  }
  const sectionId = r.u32('the ram START section')
  const idstr = r.str8('the ram START section')
  const instanceId = r.u32('the ram START section')
  const version = r.u32('the ram START section')
  if (idstr !== C.RAM_SECTION_IDSTR) throw new SnapError('SNAP_STREAM_UNSUPPORTED', `mapped-ram file: first section "${idstr}", not ram`, { offset: at })
  if (version !== C.RAM_SECTION_VERSION) throw new SnapError('SNAP_STREAM_UNSUPPORTED', `ram section version ${version} (only 4 is supported)`, { offset: at })
  return { sectionId, instanceId, version }
}

/** The MEM_SIZE list from file offset `at`, each entry where the previous block's pages end. */
async function decodeBlocks(src: RandomAccess, at: number, total: number): Promise<{ blocks: MappedRamBlock[]; end: number }> {
  const blocks: MappedRamBlock[] = []
  const names = new Set<string>()
  let sum = 0
  while (sum < total) {
    if (blocks.length >= MAX_BLOCKS) throw new SnapError('SNAP_STREAM_CORRUPT', `more than ${MAX_BLOCKS} RAM blocks`)
    const buf = await src.read(at, MAX_ENTRY)
    const r = new Reader(buf, 0, buf.length, 'SNAP_STREAM_TRUNCATED', at)
    const name = r.str8('the RAM block list')
    const size = r.u64(`RAM block ${name}`, 'SNAP_STREAM_TOO_LARGE')
    const h = decodeMappedRamHeader(r)
    const entryEnd = at + r.pos
    const fail = (code: 'SNAP_STREAM_CORRUPT' | 'SNAP_STREAM_UNSUPPORTED' | 'SNAP_MAPPED_RAM_BOUNDS' | 'SNAP_STREAM_TOO_LARGE', why: string): SnapError =>
      new SnapError(code, `mapped-ram block ${name}: ${why}`, { offset: at })
    if (name.length === 0 || names.has(name)) throw fail('SNAP_STREAM_CORRUPT', 'empty or repeated block name')
    if (size % PAGE !== 0) throw fail('SNAP_STREAM_UNSUPPORTED', `${size} bytes is not a multiple of 4096-byte pages`)
    if (size / PAGE > 0xffffffff) throw fail('SNAP_STREAM_TOO_LARGE', `${size} bytes`)
    if (h.version === 0 || h.version > C.MAPPED_RAM_HDR_VERSION) throw fail('SNAP_STREAM_UNSUPPORTED', `header version ${h.version} (only ${C.MAPPED_RAM_HDR_VERSION} is known)`)
    if (h.pageSize !== PAGE) throw fail('SNAP_STREAM_UNSUPPORTED', `page size ${h.pageSize} (only 4096)`)
    sum += size
    if (sum > total) throw fail('SNAP_STREAM_CORRUPT', `block sizes add up to more than the MEM_SIZE total ${total}`)
    const bitmapEnd = h.bitmapOffset + bitmapSize(size / PAGE)
    if (h.bitmapOffset < entryEnd) throw fail('SNAP_MAPPED_RAM_BOUNDS', `bitmap at ${h.bitmapOffset}, before the end of its header (${entryEnd})`)
    if (h.pagesOffset % PAGE !== 0) throw fail('SNAP_MAPPED_RAM_BOUNDS', `page region at ${h.pagesOffset} is not page-aligned`)
    if (h.pagesOffset < bitmapEnd) throw fail('SNAP_MAPPED_RAM_BOUNDS', `page region at ${h.pagesOffset} overlaps its bitmap (${h.bitmapOffset} to ${bitmapEnd})`)
    // The stream goes on after the pages, so they end before the file does.
    if (h.pagesOffset + size >= src.size) {
      throw fail('SNAP_MAPPED_RAM_BOUNDS', `pages ${h.pagesOffset} to ${h.pagesOffset + size} reach past the file's end (${src.size} bytes): the file is cut short or corrupt`)
    }
    names.add(name)
    blocks.push({ name, size, bitmapOffset: h.bitmapOffset, pagesOffset: h.pagesOffset })
    at = h.pagesOffset + size
  }
  return { blocks, end: at }
}

/** After the last page array: [MULTIFD_FLUSH ...] EOS and the START footer; returns the offset after. */
async function skipStartEnd(src: RandomAccess, at: number, sectionId: number): Promise<number> {
  for (let words = 0; ; words++) {
    const buf = await src.read(at, 13)
    const r = new Reader(buf, 0, buf.length, 'SNAP_STREAM_TRUNCATED', at)
    const w = r.u64('the end of the ram START section', 'SNAP_STREAM_CORRUPT')
    if (w === C.RAM_SAVE_FLAG_MULTIFD_FLUSH && words < 16) {
      at += 8
      continue
    }
    if (w !== C.RAM_SAVE_FLAG_EOS) throw new SnapError('SNAP_STREAM_CORRUPT', `record 0x${w.toString(16)} after the last mapped-ram block, not EOS`, { offset: at })
    const marker = r.u8('a section footer')
    if (marker !== C.QEMU_VM_SECTION_FOOTER || r.u32('a section footer') !== sectionId) {
      throw new SnapError('SNAP_STREAM_CORRUPT', `no footer for ram section ${sectionId} after its EOS`, { offset: at + 8 })
    }
    return at + 13
  }
}
