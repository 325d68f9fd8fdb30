// One ram PART section of a lazy restore: header, ZERO/PAGE records (the block name on every
// record, so that sections can be sent in any order), EOS, footer. Answers to page requests
// and the background push are each built as whole sections and may interleave. On the
// postcopy-preempt channel (`bare`) only the records go: it carries no sections.
import * as enc from '../stream/encoder.js'
import type { RamBlockDecl } from '../types.js'

/** A section's records add up to ~265 bytes each (word, block name) beyond the page data. */
export const RECORD_OVERHEAD = 300

export class SectionBuilder {
  private readonly rec: enc.PageRecordWriter
  count = 0
  /** page payload bytes so far (records add a few bytes each) */
  private bytes = 0

  /** `capacity`: bytes the section is expected to need (it grows past that if it must). */
  constructor(
    private readonly ramId: number,
    blocks: RamBlockDecl[],
    capacity: number,
    /** only the page records (the postcopy-preempt channel carries no sections) */
    private readonly bare = false,
    /** a writer with nothing pending to build this section in (its chunks recycled by the caller); else a new one */
    writer?: enc.PageRecordWriter,
  ) {
    // One allocation of about the section's size (an urgent section is often a single page).
    this.rec = writer ?? new enc.PageRecordWriter(blocks, { chunkSize: capacity })
    if (!bare) this.rec.raw(enc.sectionPartHeader(ramId))
  }

  size(): number {
    return this.bytes
  }

  zero(b: number, p: number): void {
    this.rec.forgetBlock()
    this.rec.zero(b, p)
    this.count++
    this.bytes += 16
  }

  page(b: number, p: number, data: Uint8Array): void {
    this.rec.forgetBlock()
    this.rec.page(b, p, data)
    this.count++
    this.bytes += data.length
  }

  finish(): Buffer {
    if (!this.bare) this.rec.raw(enc.eosFooter(this.ramId))
    const parts = this.rec.flush()
    return parts.length === 1 ? parts[0] : Buffer.concat(parts)
  }
}
