// The one answer to "where is page P" (format-spec/container.md, "page_map", "Looking up one
// page" and "Dead bytes"). Every reader and the writer use it: create fills it as pages arrive,
// load, postcopy, verify, info and the index build it from the trailer's page map (or from the
// index's runs, which are the same runs).
//
// One encoding of the answer: LOC_NEVER_SENT = 0, LOC_ZERO = 0xffffffff, else cluster + 1 (with
// a slot), or as a PageLocation. Two representations, by what a reader can afford:
// - RunLocator keeps the page map's runs (O(runs) memory, a binary search per lookup) and groups
//   them by cluster: what load, verify, info and the index need, and safe on any image, however
//   much RAM its block table claims.
// - PageLocator holds per block a Uint32Array `loc` and a Uint16Array `slot` (a cluster holds at
//   most 16384 pages): 6 bytes a page, 6 MiB for a 4 GiB VM, O(1) lookups. The writer's PageMap
//   (pages placed and replaced as the stream goes on) and lazy restore (a page fault cannot wait)
//   use it. Live slots are counted per cluster as pages move.
//
// Layers (an incremental image over its base, container.md incompatible bit 0) stack with
// `layered()`: a lookup that finds BASE (LOC_BASE: "as the base has it") in one layer asks the
// next; NEVER_SENT is an answer, as ZERO is (three states that must never be confused).
import { SnapError } from '../errors.js'
import { PAGE_BASE, PAGE_DATA, PAGE_NEVER_SENT, PAGE_ZERO, type PageState } from '../types.js'
import { BASE_CLUSTER, ZERO_CLUSTER, type PageRun } from './trailer.js'

export { BASE_CLUSTER, ZERO_CLUSTER, type PageRun }

export const LOC_NEVER_SENT = 0
export const LOC_ZERO = 0xffffffff
/** an incremental image's page that its base holds (page_map cluster BASE_CLUSTER) */
export const LOC_BASE = 0xfffffffe

/** A page_map run's cluster that holds no data: zero or base. */
export const noData = (cluster: number): boolean => cluster === ZERO_CLUSTER || cluster === BASE_CLUSTER

export interface PageLocation {
  state: PageState
  /** with PAGE_DATA: the cluster's sequence number and the page's slot in it */
  cluster?: number
  slot?: number
  /** with layered(): which layer answered (0 = the top image) */
  layer?: number
  /** with PAGE_DATA: a shared run's page (container.md "Shared slots"): the slot's pages entry may name another page */
  shared?: boolean
}

/** What a reader asks of a locator; an image over its base answers through `layered()`. */
export interface PageLookup {
  locate(block: number, page: number): PageLocation
}

/** The spec's dead bytes of one cluster: stored × (page_count − live) / page_count, rounded down. */
export function clusterDeadBytes(storedLength: number, pageCount: number, live: number): number {
  return pageCount > 0 ? Math.floor((storedLength * (pageCount - Math.min(live, pageCount))) / pageCount) : 0
}

/** Whether slot `slot` of a cluster's page list (block, page pairs) names page (block, page). */
export function slotHolds(pages: Uint32Array, slot: number, block: number, page: number): boolean {
  return slot < pages.length / 2 && pages[2 * slot] === block && pages[2 * slot + 1] === page
}

export function sameRun(a: PageRun, b: PageRun): boolean {
  return a.blockId === b.blockId && a.firstPage === b.firstPage && a.pageCount === b.pageCount && a.cluster === b.cluster && a.firstSlot === b.firstSlot && !a.shared === !b.shared
}

/**
 * Whether a page may be handed out from slot `slot` of a cluster whose page list is `pages`: an
 * owned page must be the one the slot's entry names, a shared one (container.md "Shared slots")
 * only needs the slot to exist.
 */
export function slotServes(pages: Uint32Array, slot: number, block: number, page: number, shared: boolean): boolean {
  return shared ? slot < pages.length / 2 : slotHolds(pages, slot, block, page)
}

/** The page map and a cluster's own page list disagree: never hand out that page. */
export function disagreement(block: number, page: number, cluster: number, slot: number, details: Record<string, unknown> = {}, shared = false): SnapError {
  const what = shared ? 'which the cluster does not have' : 'which holds another page'
  return new SnapError('SNAP_CORRUPT', `the page map puts page ${page} of block ${block} in slot ${slot} of cluster ${cluster}, ${what}`, { cluster, ...details })
}

export class PageLocator implements PageLookup {
  readonly loc: Uint32Array[]
  readonly slot: Uint16Array[]
  /** per block, made when its first shared page comes: 1 where the page is in a shared run */
  protected shared: Array<Uint8Array | undefined> = []
  /** pages in shared runs */
  sharedPages = 0
  /** owned pages per cluster (a shared page does not make its slot's owner live) */
  protected live = new Uint32Array(1024)

  constructor(blockPages: number[]) {
    this.loc = blockPages.map((n) => new Uint32Array(n))
    this.slot = blockPages.map((n) => new Uint16Array(n))
  }

  /** From the page map's runs (already checked by decodePageMap, or read from the index). */
  static fromRuns(blockPages: number[], runs: readonly PageRun[], clusterCount = 0): PageLocator {
    const m = new PageLocator(blockPages)
    m.live = new Uint32Array(Math.max(1024, clusterCount))
    for (const r of runs) m.addRun(r)
    return m
  }

  protected addRun(r: PageRun): void {
    const end = r.firstPage + r.pageCount
    if (noData(r.cluster)) {
      this.loc[r.blockId].fill(r.cluster === ZERO_CLUSTER ? LOC_ZERO : LOC_BASE, r.firstPage, end)
      return
    }
    this.grow(r.cluster)
    this.loc[r.blockId].fill(r.cluster + 1, r.firstPage, end)
    const s = this.slot[r.blockId]
    for (let i = 0; i < r.pageCount; i++) s[r.firstPage + i] = r.firstSlot + i
    if (r.shared) {
      this.sharedBits(r.blockId).fill(1, r.firstPage, end)
      this.sharedPages += r.pageCount
    } else this.live[r.cluster] += r.pageCount
  }

  protected sharedBits(block: number): Uint8Array {
    return (this.shared[block] ??= new Uint8Array(this.loc[block].length))
  }

  /** Whether a data page is in a shared run (its slot's pages entry may name another page). */
  isShared(block: number, page: number): boolean {
    return this.shared[block]?.[page] === 1
  }

  protected grow(cluster: number): void {
    if (cluster < this.live.length) return
    const grown = new Uint32Array(Math.max(cluster + 1, this.live.length * 2))
    grown.set(this.live)
    this.live = grown
  }

  get blockCount(): number {
    return this.loc.length
  }

  /** The raw location: LOC_NEVER_SENT, LOC_ZERO, LOC_BASE or cluster + 1 (no allocation: hot paths). */
  where(block: number, page: number): number {
    return this.loc[block][page]
  }

  state(block: number, page: number): PageState {
    return stateOf(this.loc[block][page])
  }

  /** The page's cluster; only meaningful when state() is PAGE_DATA. */
  cluster(block: number, page: number): number {
    return this.loc[block][page] - 1
  }

  slotOf(block: number, page: number): number {
    return this.slot[block][page]
  }

  locate(block: number, page: number): PageLocation {
    const l = this.loc[block]?.[page]
    if (l === undefined || l === LOC_NEVER_SENT) return { state: PAGE_NEVER_SENT }
    if (l === LOC_ZERO) return { state: PAGE_ZERO }
    if (l === LOC_BASE) return { state: PAGE_BASE }
    return this.isShared(block, page) ? { state: PAGE_DATA, cluster: l - 1, slot: this.slot[block][page], shared: true } : { state: PAGE_DATA, cluster: l - 1, slot: this.slot[block][page] }
  }

  /** Owned pages of the cluster (without shared pages: see liveSlotCounts). */
  liveCount(cluster: number): number {
    return cluster < this.live.length ? this.live[cluster] : 0
  }

  /**
   * The spec's live slots per cluster (slots some page points at, owned or shared): one pass over
   * the map with a byte per slot, only when some page is shared (else the owned counts are it).
   */
  liveSlotCounts(pageCounts: ArrayLike<number>): ArrayLike<number> {
    if (this.sharedPages === 0) {
      const owned = new Uint32Array(pageCounts.length)
      owned.set(this.live.subarray(0, pageCounts.length))
      return owned
    }
    const first = new Float64Array(pageCounts.length + 1)
    for (let c = 0; c < pageCounts.length; c++) first[c + 1] = first[c] + pageCounts[c]
    const used = new Uint8Array(first[pageCounts.length])
    const counts = new Uint32Array(pageCounts.length)
    for (let b = 0; b < this.loc.length; b++) {
      const loc = this.loc[b]
      const slot = this.slot[b]
      for (let p = 0; p < loc.length; p++) {
        const l = loc[p]
        if (l === LOC_NEVER_SENT || l === LOC_ZERO || l === LOC_BASE || l > pageCounts.length) continue
        const at = first[l - 1] + slot[p]
        if (used[at] === 0) {
          used[at] = 1
          counts[l - 1]++
        }
      }
    }
    return counts
  }

  /** Sum over clusters of the spec's dead bytes. */
  deadBytes(pageCounts: ArrayLike<number>, storedLengths: ArrayLike<number>): number {
    const live = this.liveSlotCounts(pageCounts)
    let dead = 0
    for (let c = 0; c < pageCounts.length; c++) dead += clusterDeadBytes(storedLengths[c], pageCounts[c], live[c])
    return dead
  }

  counts(block: number): { zeroPages: number; storedPages: number; basePages: number } {
    let zeroPages = 0
    let storedPages = 0
    let basePages = 0
    for (const l of this.loc[block]) {
      if (l === LOC_ZERO) zeroPages++
      else if (l === LOC_BASE) basePages++
      else if (l !== LOC_NEVER_SENT) storedPages++
    }
    return { zeroPages, storedPages, basePages }
  }

  /** Pages the image holds (storedPages + zeroPages), over every block; basePages: taken from the base. */
  totals(): { pages: number; storedPages: number; zeroPages: number; basePages: number; sharedPages: number } {
    let zeroPages = 0
    let storedPages = 0
    let basePages = 0
    for (let b = 0; b < this.loc.length; b++) {
      const c = this.counts(b)
      zeroPages += c.zeroPages
      storedPages += c.storedPages
      basePages += c.basePages
    }
    return { pages: zeroPages + storedPages, storedPages, zeroPages, basePages, sharedPages: this.sharedPages }
  }

  /** The spec's page_map: sorted by (block, first_page), adjacent pages merged into runs. */
  toRuns(): PageRun[] {
    const runs: PageRun[] = []
    for (let b = 0; b < this.loc.length; b++) {
      const loc = this.loc[b]
      const slot = this.slot[b]
      const shared = this.shared[b]
      let run: PageRun | null = null
      for (let p = 0; p < loc.length; p++) {
        const l = loc[p]
        if (l === LOC_NEVER_SENT) {
          run = null
          continue
        }
        const cluster = l === LOC_ZERO ? ZERO_CLUSTER : l === LOC_BASE ? BASE_CLUSTER : l - 1
        const s = noData(cluster) ? 0 : slot[p]
        const sh = shared !== undefined && shared[p] === 1
        if (run && run.cluster === cluster && (noData(cluster) || (run.firstSlot + run.pageCount === s && !run.shared === !sh))) {
          run.pageCount++
        } else {
          run = sh ? { blockId: b, firstPage: p, pageCount: 1, cluster, firstSlot: s, shared: true } : { blockId: b, firstPage: p, pageCount: 1, cluster, firstSlot: s }
          runs.push(run)
        }
      }
    }
    return runs
  }
}

/** The writer's locator: pages placed, replaced and moved as the stream goes on. */
export class PageMap extends PageLocator {
  static override fromRuns(blockPages: number[], runs: readonly PageRun[]): PageMap {
    const m = new PageMap(blockPages)
    for (const r of runs) m.addRun(r)
    return m
  }

  setData(block: number, page: number, cluster: number, slot: number): void {
    this.release(block, page)
    this.grow(cluster)
    this.live[cluster]++
    this.loc[block][page] = cluster + 1
    this.slot[block][page] = slot
  }

  /** The page's bytes are those of slot `slot` of `cluster`, which another page (or an older copy) owns. */
  setShared(block: number, page: number, cluster: number, slot: number): void {
    this.release(block, page)
    this.loc[block][page] = cluster + 1
    this.slot[block][page] = slot
    this.sharedBits(block)[page] = 1
    this.sharedPages++
  }

  setZero(block: number, page: number): void {
    this.release(block, page)
    this.loc[block][page] = LOC_ZERO
    this.slot[block][page] = 0
  }

  /** The page is what the base restores there (an incremental image). */
  setBase(block: number, page: number): void {
    this.release(block, page)
    this.loc[block][page] = LOC_BASE
    this.slot[block][page] = 0
  }

  /** Move a page to another slot of the same cluster (the writer fills holes in its open cluster). */
  moveSlot(block: number, page: number, slot: number): void {
    this.slot[block][page] = slot
  }

  private release(block: number, page: number): void {
    const l = this.loc[block][page]
    if (l === LOC_NEVER_SENT || l === LOC_ZERO || l === LOC_BASE) return
    const shared = this.shared[block]
    if (shared !== undefined && shared[page] === 1) {
      shared[page] = 0
      this.sharedPages--
    } else this.live[l - 1]--
  }
}

function stateOf(l: number): PageState {
  return l === LOC_NEVER_SENT ? PAGE_NEVER_SENT : l === LOC_ZERO ? PAGE_ZERO : l === LOC_BASE ? PAGE_BASE : PAGE_DATA
}

/** The page map's runs, grouped by cluster: the readers' locator (see the top of this file). */
export class RunLocator implements PageLookup {
  private readonly byCluster = new Map<number, PageRun[]>()
  private readonly live: Uint32Array

  constructor(
    private readonly blockPages: number[],
    /** sorted by (block, first_page), not overlapping (decodePageMap checked it) */
    readonly runs: readonly PageRun[],
    clusterCount: number,
  ) {
    this.live = new Uint32Array(clusterCount)
    for (const r of runs) {
      if (noData(r.cluster)) continue
      if (r.shared) this.sharedRuns++
      const list = this.byCluster.get(r.cluster)
      if (list) list.push(r)
      else this.byCluster.set(r.cluster, [r])
    }
    for (const [c, list] of this.byCluster) {
      list.sort((a, b) => a.firstSlot - b.firstSlot)
      this.live[c] = slotUnion(list)
    }
  }

  /** runs with the shared bit (container.md "Shared slots") */
  sharedRuns = 0

  /** The spec's lookup, by binary search over the runs. */
  locate(block: number, page: number): PageLocation {
    const runs = this.runs
    let lo = 0
    let hi = runs.length - 1
    let found = -1
    while (lo <= hi) {
      const mid = (lo + hi) >> 1
      const r = runs[mid]
      if (r.blockId < block || (r.blockId === block && r.firstPage <= page)) {
        found = mid
        lo = mid + 1
      } else hi = mid - 1
    }
    const r = runs[found]
    if (!r || r.blockId !== block || page >= r.firstPage + r.pageCount) return { state: PAGE_NEVER_SENT }
    if (r.cluster === ZERO_CLUSTER) return { state: PAGE_ZERO }
    if (r.cluster === BASE_CLUSTER) return { state: PAGE_BASE }
    const slot = r.firstSlot + page - r.firstPage
    return r.shared ? { state: PAGE_DATA, cluster: r.cluster, slot, shared: true } : { state: PAGE_DATA, cluster: r.cluster, slot }
  }

  /** Live slots of the cluster: slots some run points at (an owned and a shared page may share one). */
  liveCount(cluster: number): number {
    return cluster < this.live.length ? this.live[cluster] : 0
  }

  counts(block: number): { zeroPages: number; storedPages: number; basePages: number; sharedPages: number } {
    return runCounts(this.runs, (r) => r.blockId === block)
  }

  /** Pages the image holds (storedPages + zeroPages), over every block; basePages: taken from the base. */
  totals(): { pages: number; storedPages: number; zeroPages: number; basePages: number; sharedPages: number } {
    const c = runCounts(this.runs, () => true)
    return { pages: c.zeroPages + c.storedPages, ...c }
  }

  /** Every zero page, in (block, page) order. */
  forEachZero(fn: (block: number, page: number) => void): void {
    for (const r of this.runs) {
      if (r.cluster !== ZERO_CLUSTER) continue
      for (let p = r.firstPage; p < r.firstPage + r.pageCount; p++) fn(r.blockId, p)
    }
  }

  /**
   * The slots of cluster `seq` the map points at, in slot order, once the map and the cluster's
   * own page list (`pages`: block, page pairs) are shown to agree on each: SNAP_CORRUPT naming
   * the first page the map puts in a slot that holds another page.
   */
  liveSlots(seq: number, pages: Uint32Array, details: Record<string, unknown> = {}): number[] {
    const out: number[] = []
    for (const r of this.byCluster.get(seq) ?? []) {
      if (r.shared) continue
      for (let i = 0; i < r.pageCount; i++) {
        const slot = r.firstSlot + i
        if (!slotHolds(pages, slot, r.blockId, r.firstPage + i)) throw disagreement(r.blockId, r.firstPage + i, seq, slot, details)
        out.push(slot)
      }
    }
    return out
  }

  /**
   * The pages of shared runs that point into cluster `seq` (container.md "Shared slots"), as
   * (slot, block, page) triples in slot order, once each slot is shown to be in the cluster
   * (`pages`: its page list): a reader sends them with the cluster's owned pages. Empty (and
   * free) in an image without shared runs.
   */
  sharedPages(seq: number, pages: Uint32Array, details: Record<string, unknown> = {}): number[] {
    const out: number[] = []
    if (this.sharedRuns === 0) return out
    for (const r of this.byCluster.get(seq) ?? []) {
      if (!r.shared) continue
      if (r.firstSlot + r.pageCount > pages.length / 2) throw disagreement(r.blockId, r.firstPage, seq, r.firstSlot + r.pageCount - 1, details, true)
      for (let i = 0; i < r.pageCount; i++) out.push(r.firstSlot + i, r.blockId, r.firstPage + i)
    }
    return out
  }

  /** The same map as a PageLocator: O(1) lookups, 6 bytes for every page of every block. */
  pageLocator(): PageLocator {
    return PageLocator.fromRuns(this.blockPages, this.runs, this.live.length)
  }
}

/** Slots covered by runs sorted by first_slot (owned and shared runs of one cluster may overlap). */
function slotUnion(sorted: readonly PageRun[]): number {
  let n = 0
  let end = 0
  for (const r of sorted) {
    const e = r.firstSlot + r.pageCount
    if (e > end) {
      n += e - Math.max(end, r.firstSlot)
      end = e
    }
  }
  return n
}

function runCounts(runs: readonly PageRun[], keep: (r: PageRun) => boolean): { zeroPages: number; storedPages: number; basePages: number; sharedPages: number } {
  let zeroPages = 0
  let storedPages = 0
  let basePages = 0
  let sharedPages = 0
  for (const r of runs) {
    if (!keep(r)) continue
    if (r.cluster === ZERO_CLUSTER) zeroPages += r.pageCount
    else if (r.cluster === BASE_CLUSTER) basePages += r.pageCount
    else storedPages += r.pageCount
    if (r.shared) sharedPages += r.pageCount
  }
  return { zeroPages, storedPages, basePages, sharedPages }
}

/**
 * Layers, top first: each lookup is answered by the first layer whose answer is not BASE (data,
 * zero, or never sent: an image that does not take a page from its base says so for itself).
 * A bottom layer answering BASE has no base to ask: NEVER_SENT. `layer` says which one answered.
 */
export function layered(layers: readonly PageLookup[]): PageLookup {
  return {
    locate(block: number, page: number): PageLocation {
      for (let i = 0; i < layers.length; i++) {
        const l = layers[i].locate(block, page)
        if (l.state !== PAGE_BASE) return { ...l, layer: i }
      }
      return { state: PAGE_NEVER_SENT }
    },
  }
}
