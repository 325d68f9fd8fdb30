// The ram section's record word (reference §2.1: page offset | RAM_SAVE_FLAG_*, big-endian u64)
// and the MEM_SIZE record's block list (§2.3). The word's encoder is PageRecordWriter's header
// (page-record.ts); the START section's block list is written by ramStartSection (section.ts).

import type { RamBlockDecl } from '../types.js'
import type { ChunkReader } from './chunk-reader.js'
import type { SnapError } from '../errors.js'
import * as C from './constants.js'

const PAGE = C.TARGET_PAGE_SIZE
const MAX_BLOCKS = 1024
/** 16 TiB of guest RAM: beyond this a MEM_SIZE total is taken as garbage. */
const MAX_RAM = 2 ** 44

/** The error for a record word whose type (`t`, the flags without CONTINUE) create cannot take. */
export function recordError(r: ChunkReader, t: number, flags: number): SnapError {
  switch (t) {
    case C.RAM_SAVE_FLAG_COMPRESS_PAGE:
      return r.fail('SNAP_STREAM_UNSUPPORTED', 'compressed pages (capability compress, QEMU <= 9.0) are not supported; turn off capability compress')
    case C.RAM_SAVE_FLAG_HOOK:
      return r.fail('SNAP_STREAM_UNSUPPORTED', 'RDMA hook records (rdma: transport) are not supported')
    case C.RAM_SAVE_FLAG_FULL:
      return r.fail('SNAP_STREAM_CORRUPT', 'obsolete RAM_SAVE_FLAG_FULL record')
    default:
      return r.fail('SNAP_STREAM_CORRUPT', `ram record with flags 0x${flags.toString(16)}`)
  }
}

/** The MEM_SIZE record's block list: (name, used_length) entries until they add up to the total. */
export class BlockListDecoder {
  /** the list, once complete */
  blocks: RamBlockDecl[] | null = null
  private readonly pending: RamBlockDecl[] = []
  private readonly byName = new Map<string, number>()
  private total = 0
  private sum = 0

  get started(): boolean {
    return this.total > 0
  }

  /** A MEM_SIZE word `hi:lo` whose address part is `total`. */
  start(r: ChunkReader, hi: number, total: number): void {
    if (hi >= 0x200000 || total > MAX_RAM) throw r.fail('SNAP_STREAM_TOO_LARGE', `RAM total of ${hi >= 0x200000 ? 'over 2^53' : total} bytes`)
    if (total === 0) throw r.fail('SNAP_STREAM_CORRUPT', 'MEM_SIZE record with a total of 0')
    this.total = total
  }

  /** One entry (name, then `hi:lo` its size, at rb[rp]); true when the list is complete. */
  add(r: ChunkReader, n: number): boolean {
    const name = r.str(n)
    const hi = r.rb.readUInt32BE(r.rp + n)
    const lo = r.rb.readUInt32BE(r.rp + n + 4)
    if (hi >= 0x200000) throw r.fail('SNAP_STREAM_TOO_LARGE', `RAM block ${name} of over 2^53 bytes`)
    const size = hi * 0x100000000 + lo
    if (size % PAGE !== 0) throw r.fail('SNAP_STREAM_UNSUPPORTED', `RAM block ${name} of ${size} bytes is not a multiple of 4096-byte pages`)
    if (this.byName.has(name)) throw r.fail('SNAP_STREAM_CORRUPT', `RAM block ${name} listed twice`)
    if (this.pending.length >= MAX_BLOCKS) throw r.fail('SNAP_STREAM_CORRUPT', `more than ${MAX_BLOCKS} RAM blocks`)
    this.sum += size
    if (this.sum > this.total) throw r.fail('SNAP_STREAM_CORRUPT', `RAM block sizes add up to more than the MEM_SIZE total ${this.total}`)
    this.byName.set(name, this.pending.length)
    this.pending.push({ name, size })
    if (this.sum < this.total) return false
    this.blocks = this.pending
    return true
  }

  /** The block a page record names (`n` bytes at rb[rp]). */
  id(r: ChunkReader, n: number): number {
    const name = r.str(n)
    const id = this.byName.get(name)
    if (id === undefined) throw r.fail('SNAP_STREAM_CORRUPT', `page record for RAM block "${name}", which is not in the block list`)
    return id
  }
}
