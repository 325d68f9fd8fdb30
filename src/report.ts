// The words of --stats and --json (README, "Output keys"), one vocabulary for every command:
// `...Pages` count pages of guest RAM (`pages` = the pages an image holds, `storedPages` with
// data, `zeroPages` known to be zero, `ramPages` all pages of the RAM blocks), `...Records`
// count records of QEMU's migration stream, `...Bytes`/`bytes...` count bytes.
import type { StreamCounters } from './types.js'

/** What QEMU's stream held, as create read it (kept in the image's trailer as StreamCounters). */
export interface StreamReport {
  /** page records with data, re-sent pages included */
  pageRecords: number
  /** zero-page records */
  zeroRecords: number
  /** XBZRLE delta records */
  xbzrleRecords: number
  /** page records (data, zero or XBZRLE) for a page that had already been sent */
  resentRecords: number
  sections: number
  /** bytes of the QEMU stream (after a libvirt header) */
  bytes: number
}

export function streamReport(c: Partial<StreamCounters> | undefined): StreamReport {
  const n = (v: unknown): number => (typeof v === 'number' && Number.isFinite(v) ? v : 0)
  return {
    pageRecords: n(c?.pages), zeroRecords: n(c?.zeroPages), xbzrleRecords: n(c?.xbzrlePages),
    resentRecords: n(c?.resentPages), sections: n(c?.sections), bytes: n(c?.bytesIn),
  }
}
