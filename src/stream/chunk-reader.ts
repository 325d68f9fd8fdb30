// The parser's input: the chunk being pushed, and a small stash that gathers a value split
// across chunks. The record decoders (file-header.ts, section.ts, ram-record.ts, page-record.ts,
// command.ts) read at rb[rp] after need(), and make their errors here, so that every error names
// the stream offset just past the bytes it was reading.

import { SnapError, type ErrorCode } from '../errors.js'

const EMPTY = Buffer.alloc(0)

export class ChunkReader {
  /** the current chunk and the next byte to take from it */
  buf: Buffer = EMPTY
  pos = 0
  /** stream offset of buf[0] */
  base = 0
  /** where the bytes need() got are: rb[rp ...] */
  rb: Buffer
  rp = 0
  private readonly stash: Buffer
  private stashLen = 0

  constructor(maxValue: number) {
    this.stash = Buffer.allocUnsafe(maxValue)
    this.rb = this.stash
  }

  feed(chunk: Buffer): void {
    this.buf = chunk
    this.pos = 0
  }

  /** The chunk is used up (or failed): the next one starts where it ended. */
  release(): void {
    this.base += this.buf.length
    this.buf = EMPTY
    this.pos = 0
  }

  /** Make `n` bytes available at rb[rp]; false (everything taken into the stash) if the chunk ran out. */
  need(n: number): boolean {
    const left = this.buf.length - this.pos
    if (this.stashLen === 0 && left >= n) {
      this.rb = this.buf
      this.rp = this.pos
      this.pos += n
      return true
    }
    const k = Math.min(n - this.stashLen, left)
    this.buf.copy(this.stash, this.stashLen, this.pos, this.pos + k)
    this.pos += k
    this.stashLen += k
    if (this.stashLen < n) return false
    this.stashLen = 0
    this.rb = this.stash
    this.rp = 0
    return true
  }

  /** Whether part of a value has been gathered (the stream would be cut inside it). */
  get partial(): boolean {
    return this.stashLen > 0
  }

  /** The stream offset of the next byte. */
  get offset(): number {
    return this.base + this.pos
  }

  /** The `n` bytes at rb[rp] as latin1 (QEMU's idstrs and block names). */
  str(n: number, at = 0): string {
    return this.rb.toString('latin1', this.rp + at, this.rp + at + n)
  }

  fail(code: ErrorCode, msg: string): SnapError {
    return new SnapError(code, msg, { offset: this.base + this.pos })
  }
}
