// Return-path messages, destination -> source (reference §5.3; QEMU migration/migration.c
// source_return_path_thread, rp_cmd_args). Framing: BE u16 type, BE u16 length, payload.
// RECV_BITMAP (postcopy recovery) is the one message with bytes outside its length: after the
// block name, BE u64 size S (a multiple of 8), S bytes of bitmap (bit i of byte i/8 = page i
// received; QEMU's bitmap_to_le), BE u64 RAMBLOCK_RECV_BITMAP_ENDING (QEMU migration/ram.c
// ramblock_recv_bitmap_send, ram_dirty_bitmap_reload).

import { SnapError } from '../errors.js'
import { Writer } from '../bytes.js'
import {
  MIG_RP_MAX_PAYLOAD,
  MIG_RP_MSG_PONG,
  MIG_RP_MSG_RECV_BITMAP,
  MIG_RP_MSG_REQ_PAGES,
  MIG_RP_MSG_REQ_PAGES_ID,
  MIG_RP_MSG_RESUME_ACK,
  MIG_RP_MSG_SHUT,
  MIG_RP_MSG_SWITCHOVER_ACK,
  RAMBLOCK_RECV_BITMAP_ENDING,
} from './constants.js'

/** Our bound on one received bitmap: 128 MiB, the pages of 4 TiB of RAM in 4 KiB pages. */
export const RECV_BITMAP_MAX_BYTES = 1 << 27

export type RpMessage =
  | { type: 'shut'; status: number }
  | { type: 'pong'; value: number }
  /** block null: the block of the previous REQ_PAGES_ID */
  | { type: 'req'; block: string | null; offset: number; length: number }
  | { type: 'switchover-ack' }
  | { type: 'resume-ack'; value: number }
  /** the pages of `block` the destination has received (raw, as QEMU sends it: LE bit order, padded to 8 bytes) */
  | { type: 'recv-bitmap'; block: string; bitmap: Buffer }

function rpError(msg: string): SnapError {
  return new SnapError('SNAP_RETURN_PATH', `return path: ${msg}`)
}

function bitmapError(block: string, msg: string): SnapError {
  return new SnapError('SNAP_RECV_BITMAP', `the received bitmap of RAM block "${block}": ${msg}`, { block })
}

/** Payload length each type must have (REQ_PAGES_ID: 13 + name length, checked apart). */
const FIXED_LEN: Record<number, number> = {
  [MIG_RP_MSG_SHUT]: 4,
  [MIG_RP_MSG_PONG]: 4,
  [MIG_RP_MSG_REQ_PAGES]: 12,
  [MIG_RP_MSG_RESUME_ACK]: 4,
  [MIG_RP_MSG_SWITCHOVER_ACK]: 0,
}

function u64(p: Buffer, at: number): number {
  const hi = p.readUInt32BE(at)
  if (hi >= 0x200000) throw rpError('page offset over 2^53')
  return hi * 0x100000000 + p.readUInt32BE(at + 4)
}

function decode(type: number, p: Buffer): RpMessage {
  if (type === MIG_RP_MSG_REQ_PAGES_ID) {
    if (p.length < 14 || p[12] === 0 || p.length !== 13 + p[12]) {
      throw rpError(`REQ_PAGES_ID of ${p.length} bytes does not fit its block name`)
    }
    return { type: 'req', block: p.toString('latin1', 13), offset: u64(p, 0), length: p.readUInt32BE(8) }
  }
  const want = FIXED_LEN[type]
  if (want === undefined) throw rpError(`unknown message type ${type}`)
  if (p.length !== want) throw rpError(`message type ${type} with ${p.length} payload bytes (expected ${want})`)
  switch (type) {
    case MIG_RP_MSG_SHUT:
      return { type: 'shut', status: p.readUInt32BE(0) }
    case MIG_RP_MSG_PONG:
      return { type: 'pong', value: p.readUInt32BE(0) }
    case MIG_RP_MSG_REQ_PAGES:
      return { type: 'req', block: null, offset: u64(p, 0), length: p.readUInt32BE(8) }
    case MIG_RP_MSG_RESUME_ACK:
      return { type: 'resume-ack', value: p.readUInt32BE(0) }
    default:
      return { type: 'switchover-ack' }
  }
}

/** The block name of a RECV_BITMAP message (the bitmap follows outside its length). */
function bitmapBlock(p: Buffer): string {
  if (p.length < 2 || p[0] === 0 || p.length !== 1 + p[0]) throw rpError(`RECV_BITMAP of ${p.length} bytes does not fit its block name`)
  return p.toString('latin1', 1)
}

/**
 * A RECV_BITMAP's bitmap being read (it may be megabytes): kept in the pieces it came in, so that
 * memory follows the bytes received, not the size a message claims.
 */
interface BitmapInProgress {
  block: string
  /** bitmap bytes and the 8-byte end marker */
  total: number
  parts: Buffer[]
  filled: number
}

/** Push parser: feed what the return path delivers, get the whole messages it completed. */
export class ReturnPathParser {
  private pending: Buffer = Buffer.alloc(0)
  private failed: SnapError | null = null
  private bitmap: BitmapInProgress | null = null

  constructor(private readonly maxBitmapBytes = RECV_BITMAP_MAX_BYTES) {}

  push(chunk: Buffer): RpMessage[] {
    if (this.failed) throw this.failed
    const out: RpMessage[] = []
    try {
      if (this.bitmap) {
        chunk = this.fillBitmap(chunk, out)
        if (this.bitmap) return out
      }
      const buf = this.pending.length ? Buffer.concat([this.pending, chunk]) : chunk
      let pos = 0
      while (buf.length - pos >= 4) {
        const type = buf.readUInt16BE(pos)
        const len = buf.readUInt16BE(pos + 2)
        if (len > MIG_RP_MAX_PAYLOAD) throw rpError(`message type ${type} with a ${len}-byte payload (max ${MIG_RP_MAX_PAYLOAD})`)
        if (type !== MIG_RP_MSG_RECV_BITMAP) {
          if (buf.length - pos - 4 < len) break
          out.push(decode(type, buf.subarray(pos + 4, pos + 4 + len)))
          pos += 4 + len
          continue
        }
        // The name and the bitmap's size first; the bitmap itself may come in many pieces.
        if (buf.length - pos - 4 < len + 8) break
        const block = bitmapBlock(buf.subarray(pos + 4, pos + 4 + len))
        const hi = buf.readUInt32BE(pos + 4 + len)
        const size = hi * 0x100000000 + buf.readUInt32BE(pos + 8 + len)
        if (hi >= 0x200000 || size > this.maxBitmapBytes) throw bitmapError(block, `its size, ${hi >= 0x200000 ? 'over 2^53' : size} bytes, is over the ${this.maxBitmapBytes}-byte limit`)
        if (size % 8 !== 0) throw bitmapError(block, `its size, ${size} bytes, is not a multiple of 8`)
        this.bitmap = { block, total: size + 8, parts: [], filled: 0 }
        const rest = this.fillBitmap(buf.subarray(pos + 12 + len), out)
        pos = buf.length - rest.length
        if (this.bitmap) break
      }
      this.pending = Buffer.from(buf.subarray(pos))
    } catch (err) {
      this.failed = err as SnapError
      throw err
    }
    return out
  }

  /**
   * Copies bitmap bytes and the end marker from `chunk`; once complete, checks the marker, adds
   * the message to `out` and returns the bytes that follow it.
   */
  private fillBitmap(chunk: Buffer, out: RpMessage[]): Buffer {
    const b = this.bitmap!
    const n = Math.min(chunk.length, b.total - b.filled)
    if (n > 0) b.parts.push(chunk.subarray(0, n))
    b.filled += n
    if (b.filled < b.total) return chunk.subarray(n)
    const all = Buffer.concat(b.parts, b.total)
    const size = b.total - 8
    const marker = all.readBigUInt64BE(size)
    if (marker !== RAMBLOCK_RECV_BITMAP_ENDING) {
      throw bitmapError(b.block, `its end marker is 0x${marker.toString(16)}, not 0x${RAMBLOCK_RECV_BITMAP_ENDING.toString(16)} (a bitmap of another size, or damaged bytes)`)
    }
    this.bitmap = null
    out.push({ type: 'recv-bitmap', block: b.block, bitmap: all.subarray(0, size) })
    return chunk.subarray(n)
  }

  /** At the end of the return path: a message cut short is an error. */
  end(): void {
    if (this.failed) throw this.failed
    if (this.bitmap) {
      this.failed = bitmapError(this.bitmap.block, `the channel closed inside it (${this.bitmap.filled} of ${this.bitmap.total - 8} bytes and the end marker)`)
      throw this.failed
    }
    if (this.pending.length > 0) {
      this.failed = rpError(`the channel closed inside a message (${this.pending.length} bytes of it)`)
      throw this.failed
    }
  }
}

/** The bytes of one message (for tests and fakes of the destination). */
export function encodeRpMessage(msg: RpMessage): Buffer {
  switch (msg.type) {
    case 'shut':
      return Writer.alloc(8).u16(MIG_RP_MSG_SHUT).u16(4).u32(msg.status).done()
    case 'pong':
      return Writer.alloc(8).u16(MIG_RP_MSG_PONG).u16(4).u32(msg.value).done()
    case 'resume-ack':
      return Writer.alloc(8).u16(MIG_RP_MSG_RESUME_ACK).u16(4).u32(msg.value).done()
    case 'switchover-ack':
      return Writer.alloc(4).u16(MIG_RP_MSG_SWITCHOVER_ACK).u16(0).done()
    case 'recv-bitmap': {
      const n = Buffer.byteLength(msg.block, 'latin1')
      const head = Writer.alloc(4 + 1 + n + 8).u16(MIG_RP_MSG_RECV_BITMAP).u16(1 + n).str8(msg.block).u64(msg.bitmap.length).done()
      const end = Buffer.alloc(8)
      end.writeBigUInt64BE(RAMBLOCK_RECV_BITMAP_ENDING)
      return Buffer.concat([head, msg.bitmap, end])
    }
    case 'req': {
      if (msg.block === null) return Writer.alloc(16).u16(MIG_RP_MSG_REQ_PAGES).u16(12).u64(msg.offset).u32(msg.length).done()
      const n = Buffer.byteLength(msg.block, 'latin1')
      return Writer.alloc(4 + 13 + n).u16(MIG_RP_MSG_REQ_PAGES_ID).u16(13 + n).u64(msg.offset).u32(msg.length).str8(msg.block).done()
    }
  }
}
