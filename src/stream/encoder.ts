// The stream writer's building blocks: the exact bytes of the file header, the ram section
// headers and footers, page records (§2.2, §2.4) and commands (§5.1), per the reference
// (/work/shared/reference/qemu-migration-stream.md). Everything is big-endian.

import { SnapError } from '../errors.js'
import { Writer, writeU64 } from '../bytes.js'
import type { RamBlockDecl } from '../types.js'
import {
  MIG_CMD_OPEN_RETURN_PATH,
  MIG_CMD_PACKAGED,
  MIG_CMD_PING,
  MIG_CMD_POSTCOPY_ADVISE,
  MIG_CMD_POSTCOPY_LISTEN,
  MIG_CMD_POSTCOPY_RAM_DISCARD,
  MIG_CMD_POSTCOPY_RUN,
  MIG_CMD_SWITCHOVER_START,
  QEMU_VM_COMMAND,
  QEMU_VM_FILE_MAGIC,
  QEMU_VM_FILE_VERSION,
  QEMU_VM_SECTION_END,
  QEMU_VM_SECTION_FOOTER,
  QEMU_VM_SECTION_PART,
  QEMU_VM_SECTION_START,
  RAM_SAVE_FLAG_CONTINUE,
  RAM_SAVE_FLAG_EOS,
  RAM_SAVE_FLAG_MEM_SIZE,
  RAM_SAVE_FLAG_PAGE,
  RAM_SAVE_FLAG_XBZRLE,
  RAM_SAVE_FLAG_ZERO,
  RAM_SECTION_IDSTR,
  ENCODING_FLAG_XBZRLE,
  TARGET_PAGE_SIZE,
} from './constants.js'

export interface SectionIds {
  sectionId: number
  instanceId: number
  version: number
}

/** §1.1: magic, version 3, then the configuration element (0x07 ...) verbatim. */
export function fileHeader(config: Buffer): Buffer {
  const w = Writer.alloc(8 + config.length)
  return w.u32(QEMU_VM_FILE_MAGIC).u32(QEMU_VM_FILE_VERSION).bytes(config).done()
}

/** §1.5 + §2.3: the ram START section: header, MEM_SIZE record and block list, EOS, footer. */
/**
 * `hostPageSizes[i]`: block i's page size at the destination, written after its used_length when
 * it is not the target page size (a postcopy destination expects it for hugepage-backed blocks,
 * reference §2.3); leave it out for a precopy stream.
 */
export function ramStartSection(ids: SectionIds, blocks: RamBlockDecl[], hostPageSizes?: number[]): Buffer {
  let total = 0
  let size = 1 + 4 + 1 + RAM_SECTION_IDSTR.length + 4 + 4 + 8 + 8 + 5
  for (const b of blocks) {
    if (b.size % TARGET_PAGE_SIZE !== 0) {
      throw new SnapError('SNAP_INTERNAL', `block ${b.name}: size ${b.size} is not a multiple of the page size`)
    }
    total += b.size
    size += 1 + Buffer.byteLength(b.name, 'latin1') + 16
  }
  const w = Writer.alloc(size)
  w.u8(QEMU_VM_SECTION_START).u32(ids.sectionId).str8(RAM_SECTION_IDSTR).u32(ids.instanceId).u32(ids.version)
  w.u64(total + RAM_SAVE_FLAG_MEM_SIZE)
  blocks.forEach((b, i) => {
    w.str8(b.name).u64(b.size)
    const hp = hostPageSizes?.[i] ?? TARGET_PAGE_SIZE
    if (hp !== TARGET_PAGE_SIZE) w.u64(hp)
  })
  w.u64(RAM_SAVE_FLAG_EOS)
  w.u8(QEMU_VM_SECTION_FOOTER).u32(ids.sectionId)
  return w.done()
}

export function sectionPartHeader(sectionId: number): Buffer {
  return Writer.alloc(5).u8(QEMU_VM_SECTION_PART).u32(sectionId).done()
}

export function sectionEndHeader(sectionId: number): Buffer {
  return Writer.alloc(5).u8(QEMU_VM_SECTION_END).u32(sectionId).done()
}

/** The EOS record that ends every ram section body, then the section footer. */
export function eosFooter(sectionId: number): Buffer {
  return Writer.alloc(13).u64(RAM_SAVE_FLAG_EOS).u8(QEMU_VM_SECTION_FOOTER).u32(sectionId).done()
}

function command(cmd: number, payload: number): Writer {
  return Writer.alloc(5 + payload).u8(QEMU_VM_COMMAND).u16(cmd).u16(payload)
}

export const openReturnPath = (): Buffer => command(MIG_CMD_OPEN_RETURN_PATH, 0).done()
export const ping = (value: number): Buffer => command(MIG_CMD_PING, 4).u32(value).done()
export const postcopyAdvise = (hostPageSizeSummary: number, targetPageSize = TARGET_PAGE_SIZE): Buffer =>
  command(MIG_CMD_POSTCOPY_ADVISE, 16).u64(hostPageSizeSummary).u64(targetPageSize).done()
export const postcopyListen = (): Buffer => command(MIG_CMD_POSTCOPY_LISTEN, 0).done()
export const postcopyRun = (): Buffer => command(MIG_CMD_POSTCOPY_RUN, 0).done()
/** §5.2: the PACKAGED command; the `blobLength` bytes of the package must follow it. */
export const packaged = (blobLength: number): Buffer => command(MIG_CMD_PACKAGED, 4).u32(blobLength).done()
/** §5.1 POSTCOPY_RAM_DISCARD: version 0, block name, 0 terminator, 1 to 12 (start, length) byte ranges. */
export function postcopyRamDiscard(block: string, ranges: Array<[start: number, length: number]>): Buffer {
  if (ranges.length < 1 || ranges.length > 12) throw new SnapError('SNAP_INTERNAL', `${ranges.length} discard ranges`)
  const name = Buffer.from(block, 'latin1')
  const w = command(MIG_CMD_POSTCOPY_RAM_DISCARD, 3 + name.length + 16 * ranges.length).u8(0).str8(block).u8(0)
  for (const [start, length] of ranges) w.u64(start).u64(length)
  return w.done()
}
export const switchoverStart = (): Buffer => command(MIG_CMD_SWITCHOVER_START, 0).done()

export const DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024

/**
 * Appends ram page records and raw bytes into large output chunks, so the stream goes out in
 * few big writes. Each page is copied once, into the chunk. The CONTINUE state (same block as
 * the previous page record) persists across sections, as in QEMU.
 */
export class PageRecordWriter {
  private readonly names: Buffer[]
  private readonly chunkSize: number
  private chunk: Buffer
  private used = 0
  private done: Buffer[] = []
  private lastBlock = -1
  /** written chunks handed back for reuse: fresh multi-MiB buffers cost page faults and GC */
  private readonly spare: Buffer[] = []
  private readonly mine = new WeakSet<ArrayBufferLike>()

  constructor(blocks: RamBlockDecl[], opts: { chunkSize?: number } = {}) {
    this.names = blocks.map((b) => {
      const n = Buffer.from(b.name, 'latin1')
      if (n.length === 0 || n.length > 255) throw new SnapError('SNAP_INTERNAL', `bad block name "${b.name}"`)
      return n
    })
    this.chunkSize = Math.max(opts.chunkSize ?? DEFAULT_CHUNK_SIZE, 8 + 256 + 3 + TARGET_PAGE_SIZE)
    this.chunk = this.newChunk()
  }

  /** Make the next page record carry its block name (e.g. after the block list changed). */
  forgetBlock(): void {
    this.lastBlock = -1
  }

  zero(block: number, page: number): void {
    const at = this.header(block, page, RAM_SAVE_FLAG_ZERO, 1)
    this.chunk[at] = 0
    this.used = at + 1
  }

  page(block: number, page: number, data: Uint8Array): void {
    if (data.length !== TARGET_PAGE_SIZE) throw new SnapError('SNAP_INTERNAL', `page of ${data.length} bytes`)
    const at = this.header(block, page, RAM_SAVE_FLAG_PAGE, TARGET_PAGE_SIZE)
    this.chunk.set(data, at)
    this.used = at + TARGET_PAGE_SIZE
  }

  xbzrle(block: number, page: number, encoded: Uint8Array): void {
    const n = encoded.length
    if (n < 1 || n > TARGET_PAGE_SIZE) throw new SnapError('SNAP_INTERNAL', `XBZRLE data of ${n} bytes`)
    let at = this.header(block, page, RAM_SAVE_FLAG_XBZRLE, 3 + n)
    this.chunk[at] = ENCODING_FLAG_XBZRLE
    this.chunk.writeUInt16BE(n, at + 1)
    at += 3
    this.chunk.set(encoded, at)
    this.used = at + n
  }

  /** Arbitrary bytes (section headers, EOS, footers, commands, device state). */
  raw(bytes: Uint8Array): void {
    if (bytes.length <= this.chunkSize - this.used) {
      this.chunk.set(bytes, this.used)
      this.used += bytes.length
      return
    }
    this.finishChunk()
    if (bytes.length <= this.chunkSize) {
      this.chunk.set(bytes, 0)
      this.used = bytes.length
    } else {
      this.done.push(Buffer.from(bytes))
    }
  }

  /** The chunks filled so far (the partial one stays). */
  take(): Buffer[] {
    const out = this.done
    this.done = []
    return out
  }

  /** Every chunk, including the partial one. */
  flush(): Buffer[] {
    this.finishChunk()
    return this.take()
  }

  /** Writes the record word (and block name) and returns where the payload goes. */
  private header(block: number, page: number, flag: number, payload: number): number {
    const name = this.names[block]
    if (name === undefined) throw new SnapError('SNAP_INTERNAL', `no block ${block}`)
    const cont = block === this.lastBlock
    const need = 8 + (cont ? 0 : 1 + name.length) + payload
    if (need > this.chunkSize - this.used) this.finishChunk()
    let at = this.used
    writeU64(this.chunk, at, page * TARGET_PAGE_SIZE + flag + (cont ? RAM_SAVE_FLAG_CONTINUE : 0))
    at += 8
    if (!cont) {
      this.chunk[at++] = name.length
      name.copy(this.chunk, at)
      at += name.length
      this.lastBlock = block
    }
    return at
  }

  private finishChunk(): void {
    if (this.used === 0) return
    this.done.push(this.chunk.subarray(0, this.used))
    this.chunk = this.spare.pop() ?? this.newChunk()
    this.used = 0
  }

  private newChunk(): Buffer {
    const b = Buffer.allocUnsafeSlow(this.chunkSize)
    this.mine.add(b.buffer)
    return b
  }

  /** Whether `chunk` (from take()/flush()) is the start of a buffer of ours, whole. */
  owns(chunk: Buffer): boolean {
    return chunk.byteOffset === 0 && this.mine.has(chunk.buffer)
  }

  /** Give back a chunk from take()/flush() once it has been written; it will be overwritten. */
  recycle(chunk: Buffer): void {
    if (chunk.byteOffset === 0 && chunk.buffer.byteLength === this.chunkSize && this.spare.length < 4) {
      const b = Buffer.from(chunk.buffer, 0, this.chunkSize)
      this.mine.add(b.buffer)
      this.spare.push(b)
    }
  }
}
