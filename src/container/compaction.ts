// Compaction before an image is finished (format-spec/container.md, "Writing an image": dead
// bytes kept under 2%): the live pages of the partial file are copied into a new one. A cluster
// whose pages are all live is copied verbatim, its stored payload checked and not recompressed;
// the live pages of the others go back through the writer, to be re-clustered. Pages of shared
// runs (container.md "Shared slots") follow the slot they point at: into the verbatim copy, or
// through the writer with the rest (a slot only shared pages still use is kept that way).
import { SnapError } from '../errors.js'
import { decodePayload, storedCrcOk } from './cluster.js'
import type { ClusterFile } from './cluster-file.js'
import { PAGE_SIZE } from './header.js'
import { LOC_BASE, LOC_ZERO, type PageMap } from './locator.js'

export interface CompactionTarget {
  /** the new partial file, and its page map */
  file: ClusterFile
  map: PageMap
  /** the next cluster sequence number in the new file */
  nextSeq(): number
  /** a live page of a partly dead cluster, into the writer's open cluster */
  putPage(block: number, page: number, data: Uint8Array): void
  /** a shared page, at slot `slot` of the new file's cluster `seq` */
  putShared(block: number, page: number, seq: number, slot: number): void
  maxInflight: number
}

/** The zero and base pages of `from` into `to` (they have no cluster to copy). */
export function copyZeros(from: PageMap, to: PageMap): void {
  from.loc.forEach((loc, b) => loc.forEach((l, p) => (l === LOC_ZERO ? to.setZero(b, p) : l === LOC_BASE && to.setBase(b, p))))
}

/** Copy the live pages of `old` (whose page map is `oldMap`) into `to`: whole clusters first. */
export async function copyLive(old: ClusterFile, oldMap: PageMap, to: CompactionTarget): Promise<void> {
  const full: number[] = []
  const partial: number[] = []
  const shared = sharedByCluster(oldMap)
  for (let c = 0; c < old.pageCounts.length; c++) {
    const live = oldMap.liveCount(c) // owned pages
    if (live === old.pageCounts[c]) full.push(c)
    else if (live > 0 || shared.has(c)) partial.push(c)
  }
  for (const c of full) {
    const { header, stored } = old.readSync(c)
    if (!storedCrcOk(header, stored)) {
      throw new SnapError('SNAP_CHECKSUM', `cluster ${c} changed on disk while the image was written`, { cluster: c, offset: old.offsets[c] })
    }
    const seq = to.nextSeq()
    for (let i = 0; i < header.pageCount; i++) to.map.setData(header.pages[2 * i], header.pages[2 * i + 1], seq, i)
    const s = shared.get(c) ?? []
    for (let i = 0; i < s.length; i += 3) to.putShared(s[i + 1], s[i + 2], seq, s[i])
    to.file.enqueue(seq, header.pages, header.pageCount, null, Promise.resolve({ codec: header.codec, stored, framePages: header.framePages, frames: header.frames }))
    await to.file.waitBelow(to.maxInflight)
  }
  for (const c of partial) {
    const { header, stored } = old.readSync(c)
    const raw = old.cached(c) ?? (await decodePayload(header, stored, { cluster: c, offset: old.offsets[c] }))
    for (let i = 0; i < header.pageCount; i++) {
      const b = header.pages[2 * i]
      const p = header.pages[2 * i + 1]
      if (oldMap.loc[b][p] === c + 1 && oldMap.slot[b][p] === i && !oldMap.isShared(b, p)) to.putPage(b, p, raw.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE))
    }
    const s = shared.get(c) ?? []
    for (let i = 0; i < s.length; i += 3) to.putPage(s[i + 1], s[i + 2], raw.subarray(s[i] * PAGE_SIZE, (s[i] + 1) * PAGE_SIZE))
    await to.file.waitBelow(to.maxInflight)
  }
}

/** The map's shared pages by the cluster they point into: (slot, block, page) triples. */
function sharedByCluster(map: PageMap): Map<number, number[]> {
  const out = new Map<number, number[]>()
  if (map.sharedPages === 0) return out
  map.loc.forEach((loc, b) => {
    for (let p = 0; p < loc.length; p++) {
      if (!map.isShared(b, p)) continue
      const c = loc[p] - 1
      let list = out.get(c)
      if (!list) out.set(c, (list = []))
      list.push(map.slot[b][p], b, p)
    }
  })
  return out
}
