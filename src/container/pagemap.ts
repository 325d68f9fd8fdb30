// The writer's page map in memory (format-spec/container.md, "page_map" and "Dead bytes").
// Per block, one Uint32Array says where each page is (0 = never sent, ZERO_LOC = zero,
// else cluster + 1) and one Uint16Array its slot (a cluster holds at most 16384 pages):
// 6 bytes a page, 6 MiB for a 4 GiB VM. Live slots are counted per cluster as pages move.
import { PAGE_DATA, PAGE_NEVER_SENT, PAGE_ZERO, type PageState } from '../types.js'
import { ZERO_CLUSTER, type PageRun } from './trailer.js'

export { ZERO_CLUSTER, type PageRun }

export const ZERO_LOC = 0xffffffff

export class PageMap {
  readonly loc: Uint32Array[]
  readonly slot: Uint16Array[]
  private live = new Uint32Array(1024)

  constructor(blockPages: number[]) {
    this.loc = blockPages.map((n) => new Uint32Array(n))
    this.slot = blockPages.map((n) => new Uint16Array(n))
  }

  state(block: number, page: number): PageState {
    const l = this.loc[block][page]
    return l === 0 ? PAGE_NEVER_SENT : l === ZERO_LOC ? PAGE_ZERO : PAGE_DATA
  }

  /** The page's cluster; only meaningful when state() is PAGE_DATA. */
  cluster(block: number, page: number): number {
    return this.loc[block][page] - 1
  }

  liveCount(cluster: number): number {
    return cluster < this.live.length ? this.live[cluster] : 0
  }

  setData(block: number, page: number, cluster: number, slot: number): void {
    this.release(block, page)
    if (cluster >= this.live.length) {
      const grown = new Uint32Array(Math.max(cluster + 1, this.live.length * 2))
      grown.set(this.live)
      this.live = grown
    }
    this.live[cluster]++
    this.loc[block][page] = cluster + 1
    this.slot[block][page] = slot
  }

  setZero(block: number, page: number): void {
    this.release(block, page)
    this.loc[block][page] = ZERO_LOC
    this.slot[block][page] = 0
  }

  /** Move a page to another slot of the same cluster (the writer fills holes in its open cluster). */
  moveSlot(block: number, page: number, slot: number): void {
    this.slot[block][page] = slot
  }

  private release(block: number, page: number): void {
    const l = this.loc[block][page]
    if (l !== 0 && l !== ZERO_LOC) this.live[l - 1]--
  }

  /** Sum over clusters of stored × (page_count − live) / page_count, rounded down per cluster. */
  deadBytes(pageCounts: ArrayLike<number>, storedLengths: ArrayLike<number>): number {
    let dead = 0
    for (let c = 0; c < pageCounts.length; c++) {
      const n = pageCounts[c]
      if (n > 0) dead += Math.floor((storedLengths[c] * (n - this.liveCount(c))) / n)
    }
    return dead
  }

  counts(block: number): { zeroPages: number; storedPages: number } {
    let zeroPages = 0
    let storedPages = 0
    for (const l of this.loc[block]) {
      if (l === ZERO_LOC) zeroPages++
      else if (l !== 0) storedPages++
    }
    return { zeroPages, storedPages }
  }

  /** The spec's page_map: sorted by (block, first_page), adjacent pages merged into runs. */
  toRuns(): PageRun[] {
    const runs: PageRun[] = []
    for (let b = 0; b < this.loc.length; b++) {
      const loc = this.loc[b]
      const slot = this.slot[b]
      let run: PageRun | null = null
      for (let p = 0; p < loc.length; p++) {
        const l = loc[p]
        if (l === 0) {
          run = null
          continue
        }
        const cluster = l === ZERO_LOC ? ZERO_CLUSTER : l - 1
        const s = l === ZERO_LOC ? 0 : slot[p]
        if (run && run.cluster === cluster && (cluster === ZERO_CLUSTER || run.firstSlot + run.pageCount === s)) {
          run.pageCount++
        } else {
          run = { blockId: b, firstPage: p, pageCount: 1, cluster, firstSlot: s }
          runs.push(run)
        }
      }
    }
    return runs
  }

  static fromRuns(blockPages: number[], runs: PageRun[]): PageMap {
    const m = new PageMap(blockPages)
    for (const r of runs) {
      for (let i = 0; i < r.pageCount; i++) {
        if (r.cluster === ZERO_CLUSTER) m.setZero(r.blockId, r.firstPage + i)
        else m.setData(r.blockId, r.firstPage + i, r.cluster, r.firstSlot + i)
      }
    }
    return m
  }
}
