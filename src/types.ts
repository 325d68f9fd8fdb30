// The few shapes that cross module boundaries: stream parser -> page sink -> container writer,
// and container reader -> stream writer.

/** One RAM block as QEMU's MEM_SIZE list names it. */
export interface RamBlockDecl {
  name: string
  /** used_length in bytes, a multiple of the page size */
  size: number
}

/** A RAM block as the image's block table holds it. */
export interface RamBlock extends RamBlockDecl {
  id: number
  pageSize: number
}

/**
 * What the stream parser calls for the RAM section, synchronously and in stream order.
 * `data` and `encoded` are views into the parser's input: valid only during the call.
 * Pages are identified by block id (the block's position in the MEM_SIZE list) and page index.
 */
export interface RamSink {
  blocks(list: RamBlockDecl[]): void
  zero(block: number, page: number): void
  page(block: number, page: number, data: Uint8Array): void
  /** An XBZRLE delta against the page's current content (apply in stream order). */
  xbzrle(block: number, page: number, encoded: Uint8Array): void
  /** A MULTIFD_FLUSH: the k-th pairs with every multifd channel's k-th SYNC (src/multifd/receive.ts). */
  multifdFlush?(): void
}

/** Everything in a stream that is not RAM pages, kept byte for byte (see container.md, trailer records 4-6). */
export interface DeviceState {
  /** QEMU machine type from the configuration element */
  machine: string
  /** the configuration element: type byte 0x07 through its last subsection */
  config: Buffer
  ramSectionId: number
  ramInstanceId: number
  ramVersion: number
  /** a SWITCHOVER_START command came before the RAM END section */
  switchoverStart: boolean
  /** the stream had a RAM END section (false for a background snapshot) */
  ramEnd: boolean
  /** bytes after the last RAM section's footer, before the QEMU_VM_EOF byte */
  deviceSections: Buffer
  /** from the QEMU_VM_EOF byte to the end of the stream */
  streamEnd: Buffer
}

export interface StreamCounters {
  pages: number
  zeroPages: number
  xbzrlePages: number
  /** page records for a page that had already been sent in this stream */
  resentPages: number
  bytesIn: number
  sections: number
}

/** Where a page is, per the page map. */
export const PAGE_NEVER_SENT = 0
export const PAGE_ZERO = 1
export const PAGE_DATA = 2
/** an incremental image's page equal to what its base restores there (container.md, "page_map") */
export const PAGE_BASE = 3
export type PageState = typeof PAGE_NEVER_SENT | typeof PAGE_ZERO | typeof PAGE_DATA | typeof PAGE_BASE
