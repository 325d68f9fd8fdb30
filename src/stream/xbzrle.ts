// XBZRLE page deltas (reference §2.5; QEMU migration/xbzrle.c, util/cutils.c uleb128_*_small).
// An encoded page is a run list of pairs `zrun nzrun`: zrun = count of unchanged bytes,
// nzrun = count c then c literal bytes. Counts are ULEB128 limited to two bytes (14 bits).

import { SnapError } from '../errors.js'

function corrupt(why: string, at: number): SnapError {
  return new SnapError('SNAP_STREAM_CORRUPT', `XBZRLE page: ${why} at byte ${at} of the encoded data`)
}

/**
 * Apply `encoded` to `page` in place, against the page's current content. Every rule QEMU's
 * decoder applies is checked; a violation is SNAP_STREAM_CORRUPT. The page may be partly written
 * when the error is thrown (as in QEMU, the stream is unusable then anyway).
 */
export function xbzrleDecode(encoded: Uint8Array, page: Uint8Array): void {
  const slen = encoded.length
  const dlen = page.length
  let i = 0
  let d = 0
  while (i < slen) {
    // QEMU needs two bytes left before each count: a count, then at least one more byte.
    if (slen - i < 2) throw corrupt('cut run list (zero run)', i)
    let b = encoded[i]
    let zrun = b
    if (b & 0x80) {
      const b2 = encoded[i + 1]
      if (b2 & 0x80) throw corrupt('count longer than two bytes', i)
      zrun = (b & 0x7f) | (b2 << 7)
      i += 2
    } else {
      i += 1
    }
    if (zrun === 0 && d !== 0) throw corrupt('empty unchanged run after the first', i)
    d += zrun
    if (d > dlen) throw corrupt('unchanged run passes the end of the page', i)

    if (slen - i < 2) throw corrupt('cut run list (literal run)', i)
    b = encoded[i]
    let nzrun = b
    if (b & 0x80) {
      const b2 = encoded[i + 1]
      if (b2 & 0x80) throw corrupt('count longer than two bytes', i)
      nzrun = (b & 0x7f) | (b2 << 7)
      i += 2
    } else {
      i += 1
    }
    if (nzrun === 0) throw corrupt('empty literal run', i)
    if (d + nzrun > dlen) throw corrupt('literal run passes the end of the page', i)
    if (i + nzrun > slen) throw corrupt('literal run passes the end of the data', i)
    page.set(encoded.subarray(i, i + nzrun), d)
    d += nzrun
    i += nzrun
  }
}

function putCount(out: Uint8Array, at: number, v: number): number {
  if (v < 0x80) {
    out[at] = v
    return 1
  }
  out[at] = (v & 0x7f) | 0x80
  out[at + 1] = v >> 7
  return 2
}

/**
 * Encode `newPage` as a delta against `oldPage` (same length, ≤ 16 KiB). Returns null when the
 * encoding would be longer than a page (QEMU then sends a PAGE record), and an empty buffer when
 * the pages are equal (QEMU then sends nothing).
 */
export function xbzrleEncode(oldPage: Uint8Array, newPage: Uint8Array): Buffer | null {
  const n = newPage.length
  if (oldPage.length !== n || n > 0x4000) {
    throw new SnapError('SNAP_INTERNAL', `xbzrleEncode: pages of ${oldPage.length} and ${n} bytes`)
  }
  const out = Buffer.allocUnsafe(n + 4)
  let o = 0
  let i = 0
  while (i < n) {
    const zStart = i
    while (i < n && oldPage[i] === newPage[i]) i++
    if (i === n) break // the trailing unchanged run is omitted
    const zrun = i - zStart
    const nzStart = i
    while (i < n && oldPage[i] !== newPage[i]) i++
    const nzrun = i - nzStart
    // the worst case for this pair: two 2-byte counts and the literals
    if (o + 4 + nzrun > n + 4) return null
    o += putCount(out, o, zrun)
    o += putCount(out, o, nzrun)
    out.set(newPage.subarray(nzStart, i), o)
    o += nzrun
    if (o > n) return null
  }
  return out.subarray(0, o)
}
