// The page map in memory, one typed array per RAM block: for lazy restore, where every page
// request must be answered without touching LevelDB or the disk (DESIGN.md: ~70 µs per awaited
// LevelDB get is too slow for a page fault). Built once from the index's runs.

import { ZERO_CLUSTER, type PageRun } from './container/trailer.js'
import { SnapError } from './errors.js'
import type { RamBlock } from './types.js'

const NEVER = -1
const ZERO = -2

export class PageTable {
  /** per block, per page: NEVER, ZERO, or the cluster's sequence number */
  private readonly cluster: Int32Array[]
  /** per block, per page: slot within the cluster */
  private readonly slot: Uint32Array[]
  private readonly byName = new Map<string, number>()

  constructor(
    readonly blocks: RamBlock[],
    runs: PageRun[],
  ) {
    this.cluster = blocks.map((b) => new Int32Array(b.size / b.pageSize).fill(NEVER))
    this.slot = blocks.map((b) => new Uint32Array(b.size / b.pageSize))
    for (const b of blocks) this.byName.set(b.name, b.id)
    for (const r of runs) {
      const c = this.cluster[r.blockId]
      if (r.cluster === ZERO_CLUSTER) {
        c.fill(ZERO, r.firstPage, r.firstPage + r.pageCount)
      } else {
        c.fill(r.cluster, r.firstPage, r.firstPage + r.pageCount)
        const s = this.slot[r.blockId]
        for (let i = 0; i < r.pageCount; i++) s[r.firstPage + i] = r.firstSlot + i
      }
    }
  }

  /** Block id for a name QEMU sent; SNAP_BAD_REQUEST when the image has no such block. */
  blockId(name: string): number {
    const id = this.byName.get(name)
    if (id === undefined) throw new SnapError('SNAP_BAD_REQUEST', `QEMU asked for a page of RAM block "${name}", which the image does not have`)
    return id
  }

  pages(block: number): number {
    return this.cluster[block].length
  }

  /** -1: never sent, -2: zero, otherwise the cluster; `slotOf` then gives the slot. */
  where(block: number, page: number): number {
    return this.cluster[block][page]
  }

  slotOf(block: number, page: number): number {
    return this.slot[block][page]
  }

  static readonly NEVER = NEVER
  static readonly ZERO = ZERO
}
