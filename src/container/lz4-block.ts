// LZ4 block decoding into a buffer the caller gives (format-spec/container.md, "Codecs", codec 1:
// a u32 LE raw length, then one LZ4 block). lz4-napi only returns a new Buffer per call: on a
// restore that is fresh, page-faulting memory per frame and a copy. The decoder is the system's
// liblz4 through snapctl's own small addon (native/lz4, built by `npm run build`): 0.08 CPU-s for the
// 511 MiB of frames of a 1 GiB benchmark image, where the JavaScript decoder below took 0.46 to
// 0.61 s and lz4-napi 0.19 s plus the faults of its allocations. The JavaScript decoder stays for
// a checkout whose addon is not built (it is then used and `lz4Decoder()` says so); the block
// format is lz4's doc/lz4_Block_format.md: sequences of (token, literal length, literals, offset,
// match length). Either way every read and write is bounds-checked: a payload that lies throws,
// it never reads or writes outside its buffers.
import { createRequire } from 'node:module'
import { nativeAddon } from '../native.js'

interface NativeLz4 {
  decodeBlock(src: Uint8Array, dst: Uint8Array): number
  compressBlock(src: Uint8Array, dst: Uint8Array): number
  compressBound(n: number): number
  crc32(src: Uint8Array): number
  /** src in frames of frameBytes, each stored as encodeFrames (cluster.ts) stores it, on a libuv pool thread */
  encodeFramesAsync(src: Uint8Array, dst: Uint8Array, frameBytes: number, frames: Uint32Array): Promise<number>
  version: string
}

/** The addon, loaded on first use; null when it is not built. */
export function nativeLz4(): NativeLz4 | null {
  return nativeAddon<NativeLz4>()
}

// lz4-napi for a checkout without the addon: loaded only then.
let napi: { compressSync(b: Uint8Array): Buffer } | undefined

/**
 * Compress `src` as codec 1 writes it (a u32 LE raw length, then one LZ4 block) into `dst`;
 * returns the bytes written, or 0 when that does not fit in dst (the caller stores src raw).
 */
export function compressLz4Into(src: Uint8Array, dst: Uint8Array): number {
  if (dst.length <= 4) return 0
  const lib = nativeLz4()
  if (!lib) {
    napi ??= createRequire(import.meta.url)('lz4-napi') as { compressSync(b: Uint8Array): Buffer }
    const c = napi.compressSync(src)
    if (c.length > dst.length) return 0
    dst.set(c)
    return c.length
  }
  const n = lib.compressBlock(src, dst.subarray(4))
  if (n === 0) return 0
  new DataView(dst.buffer, dst.byteOffset, 4).setUint32(0, src.length, true)
  return n + 4
}

/** Which decoder decodeLz4Block uses: `liblz4 1.9.4`, or `javascript` without the addon. */
export function lz4Decoder(): string {
  const n = nativeLz4()
  return n ? `liblz4 ${n.version}` : 'javascript'
}

/** Thrown for a block that does not decode; callers turn it into SNAP_CORRUPT. */
export class Lz4Error extends Error {}

/** Literal or match runs at most this long are copied byte by byte (cheaper than a native call). */
const SHORT = 16

/**
 * Decode the LZ4 block src[start, end) into out[0, outLength); returns the bytes written. It
 * must fill exactly `outLength` (the caller's raw_length), else Lz4Error.
 */
export function decodeLz4Block(src: Uint8Array, start: number, end: number, out: Uint8Array, outLength: number): number {
  if (end > src.length || outLength > out.length) throw new Lz4Error('buffer too small')
  const lib = nativeLz4()
  if (!lib) return decodeLz4BlockJs(src, start, end, out, outLength)
  const n = lib.decodeBlock(src.subarray(start, end), out.subarray(0, outLength))
  if (n < 0) throw new Lz4Error(`not an LZ4 block of at most ${outLength} bytes`)
  if (n !== outLength) throw new Lz4Error(`decodes to ${n} bytes, not ${outLength}`)
  return n
}

/** The same in JavaScript (what runs without the addon; the tests hold the two to each other). */
export function decodeLz4BlockJs(src: Uint8Array, start: number, end: number, out: Uint8Array, outLength: number): number {
  if (end > src.length || outLength > out.length) throw new Lz4Error('buffer too small')
  let ip = start
  let op = 0
  for (;;) {
    if (ip >= end) throw new Lz4Error('cut short before a token')
    const token = src[ip++]
    let lit = token >>> 4
    if (lit === 15) {
      let b: number
      do {
        if (ip >= end) throw new Lz4Error('cut short in a literal length')
        b = src[ip++]
        lit += b
      } while (b === 255)
    }
    if (lit > end - ip) throw new Lz4Error('literals run past the input')
    if (lit > outLength - op) throw new Lz4Error('literals run past raw_length')
    if (lit <= SHORT) {
      for (let i = 0; i < lit; i++) out[op + i] = src[ip + i]
    } else {
      out.set(src.subarray(ip, ip + lit), op)
    }
    ip += lit
    op += lit
    if (ip === end) break // the last sequence holds literals only
    if (end - ip < 2) throw new Lz4Error('cut short in an offset')
    const offset = src[ip] | (src[ip + 1] << 8)
    ip += 2
    if (offset === 0 || offset > op) throw new Lz4Error(`match offset ${offset} at output ${op}`)
    let len = (token & 15) + 4
    if (len === 19) {
      let b: number
      do {
        if (ip >= end) throw new Lz4Error('cut short in a match length')
        b = src[ip++]
        len += b
      } while (b === 255)
    }
    if (len > outLength - op) throw new Lz4Error('match runs past raw_length')
    const from = op - offset
    if (len <= SHORT) {
      for (let i = 0; i < len; i++) out[op + i] = out[from + i]
      op += len
    } else if (offset >= len) {
      out.copyWithin(op, from, from + len)
      op += len
    } else {
      // An overlapping match repeats the `offset` bytes before it: copy them, then keep copying
      // from the same start, each time twice as much (the copied run is periodic).
      const stop = op + len
      while (op < stop) {
        const n = Math.min(op - from, stop - op)
        out.copyWithin(op, from, from + n)
        op += n
      }
    }
  }
  if (op !== outLength) throw new Lz4Error(`decodes to ${op} bytes, not ${outLength}`)
  return op
}
