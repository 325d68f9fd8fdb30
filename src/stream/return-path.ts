// Return-path messages, destination -> source (reference §5.3; QEMU migration/migration.c
// source_return_path_thread, rp_cmd_args). Framing: BE u16 type, BE u16 length, payload.

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
} from './constants.js'

export type RpMessage =
  | { type: 'shut'; status: number }
  | { type: 'pong'; value: number }
  /** block null: the block of the previous REQ_PAGES_ID */
  | { type: 'req'; block: string | null; offset: number; length: number }
  | { type: 'switchover-ack' }
  | { type: 'resume-ack'; value: number }

function rpError(msg: string): SnapError {
  return new SnapError('SNAP_RETURN_PATH', `return path: ${msg}`)
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
  if (type === MIG_RP_MSG_RECV_BITMAP) throw rpError('unexpected RECV_BITMAP (postcopy recovery is not supported)')
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

/** Push parser: feed what the return path delivers, get the whole messages it completed. */
export class ReturnPathParser {
  private pending: Buffer = Buffer.alloc(0)
  private failed: SnapError | null = null

  push(chunk: Buffer): RpMessage[] {
    if (this.failed) throw this.failed
    const buf = this.pending.length ? Buffer.concat([this.pending, chunk]) : chunk
    const out: RpMessage[] = []
    let pos = 0
    try {
      while (buf.length - pos >= 4) {
        const type = buf.readUInt16BE(pos)
        const len = buf.readUInt16BE(pos + 2)
        if (len > MIG_RP_MAX_PAYLOAD) throw rpError(`message type ${type} with a ${len}-byte payload (max ${MIG_RP_MAX_PAYLOAD})`)
        if (buf.length - pos - 4 < len) break
        out.push(decode(type, buf.subarray(pos + 4, pos + 4 + len)))
        pos += 4 + len
      }
    } catch (err) {
      this.failed = err as SnapError
      throw err
    }
    this.pending = Buffer.from(buf.subarray(pos))
    return out
  }

  /** At the end of the return path: a message cut short is an error. */
  end(): void {
    if (this.failed) throw this.failed
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
    case 'req': {
      if (msg.block === null) return Writer.alloc(16).u16(MIG_RP_MSG_REQ_PAGES).u16(12).u64(msg.offset).u32(msg.length).done()
      const n = Buffer.byteLength(msg.block, 'latin1')
      return Writer.alloc(4 + 13 + n).u16(MIG_RP_MSG_REQ_PAGES_ID).u16(13 + n).u64(msg.offset).u32(msg.length).str8(msg.block).done()
    }
  }
}
