// Postcopy recovery (QEMU migration/ram.c ram_dirty_bitmap_reload, migration/savevm.c
// loadvm_handle_recv_bitmap): the destination's received bitmap of a RAM block says which of
// its target pages are in place. A restore that continues must send every other page it would
// have sent, and none of these: a page placed twice fails UFFDIO_COPY with EEXIST and pauses
// the destination again. Each bitmap is checked against the image's block before anything is
// resumed, the way QEMU's own source checks its size.
import { SnapError } from '../errors.js'
import type { RamBlock } from '../types.js'

/** QEMU's size of a block's bitmap: one bit per target page, rounded up to whole 8-byte words. */
export function receivedBitmapBytes(pages: number): number {
  return Math.ceil(pages / 64) * 8
}

function bad(block: RamBlock, msg: string): SnapError {
  return new SnapError('SNAP_RECV_BITMAP', `the received bitmap of RAM block "${block.name}": ${msg}; is this the image the lazy restore started from?`, { block: block.name })
}

/**
 * Marks in `sent` (one byte per target page of `block`) every page the bitmap says the
 * destination has; returns how many. `hostPages`: target pages per destination host page (a
 * hugepage is placed whole, so its bits are all set or all clear).
 */
export function applyReceivedBitmap(block: RamBlock, hostPages: number, bitmap: Uint8Array, sent: Uint8Array): number {
  const pages = block.size / block.pageSize
  const want = receivedBitmapBytes(pages)
  if (bitmap.length !== want) throw bad(block, `${bitmap.length} bytes, where its ${pages} pages take ${want}`)
  let count = 0
  for (let byte = 0; byte < bitmap.length; byte++) {
    let v = bitmap[byte]
    if (v === 0) continue
    for (let bit = 0; v !== 0; bit++, v >>= 1) {
      if ((v & 1) === 0) continue
      const p = byte * 8 + bit
      if (p >= pages) throw bad(block, `page ${p} is marked received, past the block's ${pages} pages`)
      sent[p] = 1
      count++
    }
  }
  if (hostPages > 1) {
    for (let first = 0; first < pages; first += hostPages) {
      const n = sent.subarray(first, first + hostPages).reduce((a, b) => a + b, 0)
      if (n !== 0 && n !== hostPages) throw bad(block, `the host page at page ${first} is partly received (${n} of ${hostPages} pages)`)
    }
  }
  return count
}
