// Page records (reference §2.2 ZERO, PAGE, §2.4 XBZRLE): PageRecordWriter appends them (and
// anything else) into large output chunks; the parser's checks of a ZERO record's fill byte and
// an XBZRLE record's header are here beside it.

import { SnapError } from '../errors.js'
import { writeU64 } from '../bytes.js'
import type { RamBlockDecl } from '../types.js'
import type { ChunkReader } from './chunk-reader.js'
import {
  ENCODING_FLAG_XBZRLE,
  RAM_SAVE_FLAG_CONTINUE,
  RAM_SAVE_FLAG_PAGE,
  RAM_SAVE_FLAG_XBZRLE,
  RAM_SAVE_FLAG_ZERO,
  TARGET_PAGE_SIZE,
} from './constants.js'

/** A ZERO record's fill byte, at rb[rp]: QEMU >= 8.2 writes only 0. */
export function checkZeroFill(r: ChunkReader): void {
  if (r.rb[r.rp] !== 0) throw r.fail('SNAP_STREAM_CORRUPT', `ZERO record with fill byte 0x${r.rb[r.rp].toString(16)} (QEMU >= 8.2 requires 0)`)
}

/** An XBZRLE record's 3-byte header at rb[rp] (encoding flag, u16 length): returns the length. */
export function decodeXbzrleHeader(r: ChunkReader): number {
  if (r.rb[r.rp] !== ENCODING_FLAG_XBZRLE) throw r.fail('SNAP_STREAM_CORRUPT', `XBZRLE record with encoding flag ${r.rb[r.rp]}`)
  const n = r.rb.readUInt16BE(r.rp + 1)
  if (n < 1 || n > TARGET_PAGE_SIZE) throw r.fail('SNAP_STREAM_CORRUPT', `XBZRLE record of ${n} bytes`)
  return n
}

export const DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
/** The most bytes a PAGE record's header takes: record word, name length, a name of 255 bytes. */
export const PAGE_HEADER_MAX = 8 + 1 + 255

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

  /**
   * The header of a PAGE record (record word, block name unless CONTINUE) written into `dst` at
   * `at`, in this writer's order (the CONTINUE state is shared): the page itself goes out on its
   * own, after it, where it lies (load's vectored writes). Returns where the header ends; `dst`
   * needs PAGE_HEADER_MAX bytes from `at`.
   */
  pageHeader(block: number, page: number, dst: Buffer, at: number): number {
    return this.headerAt(dst, at, block, page, RAM_SAVE_FLAG_PAGE)
  }

  /** Writes the record word (and block name) and returns where the payload goes. */
  private header(block: number, page: number, flag: number, payload: number): number {
    const name = this.names[block]
    if (name === undefined) throw new SnapError('SNAP_INTERNAL', `no block ${block}`)
    const need = 8 + (block === this.lastBlock ? 0 : 1 + name.length) + payload
    if (need > this.chunkSize - this.used) this.finishChunk()
    return this.headerAt(this.chunk, this.used, block, page, flag)
  }

  private headerAt(dst: Buffer, at: number, block: number, page: number, flag: number): number {
    const name = this.names[block]
    if (name === undefined) throw new SnapError('SNAP_INTERNAL', `no block ${block}`)
    const cont = block === this.lastBlock
    writeU64(dst, at, page * TARGET_PAGE_SIZE + flag + (cont ? RAM_SAVE_FLAG_CONTINUE : 0))
    at += 8
    if (!cont) {
      dst[at++] = name.length
      name.copy(dst, at)
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
