// Bounds-checked big-endian reading and writing over a Buffer, shared by every codec
// (the container's structures and QEMU's stream). In the manner of compact-encoding: a cursor
// over {buffer, start, end}; every read checks what is left first and throws the caller's
// error code instead of reading garbage.

import { SnapError, type ErrorCode } from './errors.js'

export class Reader {
  pos: number
  readonly end: number

  constructor(
    readonly buf: Buffer,
    start = 0,
    end = buf.length,
    /** the code thrown when a read would pass `end` */
    readonly truncatedCode: ErrorCode = 'SNAP_TRUNCATED',
    /** file or stream offset of buf[0], for error messages */
    readonly baseOffset = 0,
  ) {
    this.pos = start
    this.end = end
  }

  get left(): number {
    return this.end - this.pos
  }

  need(n: number, what: string): void {
    if (n > this.end - this.pos) {
      throw new SnapError(this.truncatedCode, `${what}: needs ${n} bytes, ${this.end - this.pos} left`, {
        offset: this.baseOffset + this.pos,
      })
    }
  }

  u8(what = 'u8'): number {
    this.need(1, what)
    return this.buf[this.pos++]
  }

  u16(what = 'u16'): number {
    this.need(2, what)
    const v = this.buf.readUInt16BE(this.pos)
    this.pos += 2
    return v
  }

  u32(what = 'u32'): number {
    this.need(4, what)
    const v = this.buf.readUInt32BE(this.pos)
    this.pos += 4
    return v
  }

  /** A u64 that must fit in a JS number (< 2^53); larger values are `tooLargeCode`. */
  u64(what = 'u64', tooLargeCode: ErrorCode = 'SNAP_TOO_LARGE'): number {
    this.need(8, what)
    const hi = this.buf.readUInt32BE(this.pos)
    const lo = this.buf.readUInt32BE(this.pos + 4)
    if (hi >= 0x200000) {
      throw new SnapError(tooLargeCode, `${what}: value 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} is too large`, {
        offset: this.baseOffset + this.pos,
      })
    }
    this.pos += 8
    return hi * 0x100000000 + lo
  }

  bytes(n: number, what = 'bytes'): Buffer {
    this.need(n, what)
    const b = this.buf.subarray(this.pos, this.pos + n)
    this.pos += n
    return b
  }

  /** One length byte, then that many bytes (QEMU's idstr encoding). */
  str8(what = 'str8'): string {
    const n = this.u8(what)
    return this.bytes(n, what).toString('latin1')
  }
}

export class Writer {
  pos = 0
  constructor(readonly buf: Buffer) {}

  static alloc(n: number): Writer {
    return new Writer(Buffer.alloc(n))
  }

  u8(v: number): this {
    this.buf[this.pos++] = v
    return this
  }

  u16(v: number): this {
    this.buf.writeUInt16BE(v, this.pos)
    this.pos += 2
    return this
  }

  u32(v: number): this {
    this.buf.writeUInt32BE(v >>> 0, this.pos)
    this.pos += 4
    return this
  }

  u64(v: number): this {
    writeU64(this.buf, this.pos, v)
    this.pos += 8
    return this
  }

  bytes(b: Uint8Array): this {
    this.buf.set(b, this.pos)
    this.pos += b.length
    return this
  }

  str8(s: string): this {
    const b = Buffer.from(s, 'latin1')
    if (b.length > 255) throw new SnapError('SNAP_INTERNAL', `name longer than 255 bytes: ${s.slice(0, 40)}...`)
    this.u8(b.length)
    return this.bytes(b)
  }

  zeros(n: number): this {
    this.buf.fill(0, this.pos, this.pos + n)
    this.pos += n
    return this
  }

  done(): Buffer {
    return this.buf.subarray(0, this.pos)
  }
}

export function writeU64(buf: Buffer, pos: number, v: number): void {
  buf.writeUInt32BE(Math.floor(v / 0x100000000), pos)
  buf.writeUInt32BE(v >>> 0, pos + 4)
}

export const roundUp = (n: number, to: number): number => Math.ceil(n / to) * to

export function isAllZero(b: Uint8Array): boolean {
  // Compare 8 bytes at a time; pages are 4096-aligned lengths.
  const n = b.length
  if (n % 8 === 0 && b.byteOffset % 8 === 0) {
    const w = new BigUint64Array(b.buffer, b.byteOffset, n / 8)
    for (let i = 0; i < w.length; i++) if (w[i] !== 0n) return false
    return true
  }
  for (let i = 0; i < n; i++) if (b[i] !== 0) return false
  return true
}
