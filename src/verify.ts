// `snapctl verify`: read every byte of an image and check it (format-spec/container.md,
// "Reading an image" steps 1-5, the page map against each cluster's page list) and the page
// index against the image (format-spec/index.md). Problems are collected, not thrown, so that
// one damaged cluster does not hide the next. A check writes nothing: a missing index is
// reported as missing (it is a cache: any load rebuilds it), and only `rebuildIndex` builds one.
import { stat } from 'node:fs/promises'
import { SnapError, fromSystemError, type ErrorCode } from './errors.js'
import { ImageReader } from './container/reader.js'
import { clusterDeadBytes } from './container/locator.js'
import { openImage } from './container/chain.js'
import { PageIndex } from './index/page-index.js'

export interface Problem {
  code: ErrorCode
  message: string
  /** in a chain: the image of the chain it is about, when not the top one */
  image?: string
  cluster?: number
  offset?: number
}

export interface VerifyReport {
  path: string
  /** the image and its index check out */
  ok: boolean
  /** the image itself checks out (the index may still be stale or wrong) */
  imageOk: boolean
  problems: Problem[]
  clusters: number
  clustersOk: number
  pages: number
  zeroPages: number
  storedPages: number
  fileBytes: number
  storedBytes: number
  deadBytes: number
  bytesRead: number
  seconds: number
  /**
   * ok: fresh and equal to the image; missing: there is none (not a problem); built, rebuilt:
   * it was missing, or stale or damaged, and rebuildIndex made it; bad: see problems;
   * unchecked: the image has problems, or the index cannot be opened here (a read-only place)
   */
  index: 'ok' | 'missing' | 'built' | 'rebuilt' | 'bad' | 'unchecked'
  /**
   * an incremental image: every image of its chain, top first, each checked as this one is
   * (the top's counts are above); null for a standalone image
   */
  chain: Array<{ path: string; ok: boolean; clusters: number; fileBytes: number }> | null
}

/** Errors that are not about the image's content: raised, not listed. */
const NOT_DAMAGE: ErrorCode[] = [
  'SNAP_NOT_FOUND', 'SNAP_BAD_PATH', 'SNAP_IO', 'SNAP_LOCKED', 'SNAP_INTERNAL',
  'SNAP_OBJECT_CONFIG', 'SNAP_OBJECT_DENIED', 'SNAP_OBJECT_NOT_FOUND', 'SNAP_OBJECT_UNAVAILABLE',
]

function problem(e: unknown, where: { cluster?: number; offset?: number } = {}): Problem {
  const err = fromSystemError(e, 'verify')
  const p: Problem = { code: err.code, message: err.message }
  const cluster = err.context.cluster ?? where.cluster
  const offset = err.context.offset ?? where.offset
  if (cluster !== undefined) p.cluster = cluster
  if (offset !== undefined) p.offset = offset
  return p
}

export interface VerifyOptions {
  onProgress?: (doneBytes: number, totalBytes: number) => void
  /** false: check the image only, not its page index */
  index?: boolean
  /** build a missing index, rebuild a stale or damaged one (the only time verify writes) */
  rebuildIndex?: boolean
}

/** The image, and when it is incremental, its chain: opened (SNAP_BASE_*) and every image checked. */
export async function verifyImage(path: string, opts: VerifyOptions = {}): Promise<VerifyReport> {
  let base = false
  const report = await verifyOne(path, opts, (r) => (base = r.base !== null))
  if (!base || !report.imageOk) return report
  const started = performance.now() - report.seconds * 1000
  report.chain = [{ path: report.path, ok: report.ok, clusters: report.clusters, fileBytes: report.fileBytes }]
  let lower: string[]
  try {
    const chain = await openImage(path, { whileCreating: 'refuse' })
    lower = 'layers' in chain ? chain.layers.slice(1).map((l) => l.path) : []
    await chain.close()
  } catch (e) {
    if (e instanceof SnapError && NOT_DAMAGE.includes(e.code)) throw e
    report.problems.push(problem(e))
    lower = []
  }
  for (const p of lower) {
    const sub = await verifyOne(p, { ...opts, onProgress: undefined }, () => {})
    report.chain.push({ path: p, ok: sub.ok, clusters: sub.clusters, fileBytes: sub.fileBytes })
    for (const pr of sub.problems) report.problems.push({ ...pr, image: p, message: `${p}: ${pr.message}` })
  }
  report.ok = report.problems.length === 0
  report.imageOk = !report.problems.some((p) => p.code !== 'SNAP_INDEX_MISMATCH' && p.code !== 'SNAP_INDEX_CORRUPT')
  report.seconds = (performance.now() - started) / 1000
  return report
}

async function verifyOne(path: string, opts: VerifyOptions, opened: (r: ImageReader) => void): Promise<VerifyReport> {
  const started = performance.now()
  const report: VerifyReport = {
    path, ok: false, imageOk: false, problems: [], clusters: 0, clustersOk: 0, pages: 0, zeroPages: 0, storedPages: 0,
    fileBytes: 0, storedBytes: 0, deadBytes: 0, bytesRead: 0, seconds: 0, index: 'unchecked', chain: null,
  }
  const finish = () => {
    report.imageOk = !report.problems.some((p) => p.code !== 'SNAP_INDEX_MISMATCH' && p.code !== 'SNAP_INDEX_CORRUPT')
    report.ok = report.problems.length === 0
    report.seconds = (performance.now() - started) / 1000
    return report
  }
  // The image (and its index) is about to be replaced: checking it now proves nothing.
  let reader: ImageReader
  try {
    reader = await ImageReader.open(path, { whileCreating: 'refuse' })
  } catch (e) {
    if (e instanceof SnapError && NOT_DAMAGE.includes(e.code)) throw e
    report.fileBytes = (await stat(path).catch(() => ({ size: 0 }))).size
    report.problems.push(problem(e))
    return finish()
  }
  opened(reader)
  try {
    report.fileBytes = reader.fileLength
    report.clusters = reader.clusterOffsets.length
    await checkClusters(reader, report, opts.onProgress)
    if (report.problems.length === 0 && opts.index !== false) await checkIndex(reader, report, opts.rebuildIndex === true)
    opts.onProgress?.(report.fileBytes, report.fileBytes)
  } finally {
    await reader.close()
  }
  return finish()
}

async function checkClusters(reader: ImageReader, report: VerifyReport, onProgress?: (d: number, t: number) => void): Promise<void> {
  const locator = reader.locator
  const blockPages = reader.blocks.map((b) => b.size / b.pageSize)
  Object.assign(report, locator.totals())
  let done = reader.fileLength - reader.header.trailerOffset + 4096
  for await (const res of reader.clusterResults({ onRead: (n) => onProgress?.((done += n), reader.fileLength) })) {
    const c = res.cluster
    if (!c) {
      report.problems.push(problem(res.error, { cluster: res.seq, offset: res.offset }))
      continue
    }
    const where = { cluster: c.seq, offset: c.offset }
    const pageCount = c.pages.length / 2
    report.storedBytes += c.storedLength
    report.deadBytes += clusterDeadBytes(c.storedLength, pageCount, locator.liveCount(c.seq))
    let bad = pageListProblem(c.pages, blockPages)
    if (!bad) {
      try {
        locator.liveSlots(c.seq, c.pages)
        locator.sharedPages(c.seq, c.pages) // shared runs point at slots the cluster has
      } catch (e) {
        bad = (e as Error).message
      }
    }
    if (bad) report.problems.push({ code: 'SNAP_CORRUPT', message: `cluster ${c.seq} at offset ${c.offset}: ${bad}`, ...where })
    else report.clustersOk++
  }
  report.bytesRead = reader.fileLength
}

/** A cluster's own page list: every page inside the RAM blocks, none twice. */
function pageListProblem(pages: Uint32Array, blockPages: number[]): string | null {
  const seen = new Set<number>()
  for (let s = 0; s < pages.length / 2; s++) {
    const b = pages[2 * s]
    const p = pages[2 * s + 1]
    if (b >= blockPages.length || p >= blockPages[b]) return `slot ${s} names page ${p} of block ${b}, outside the RAM blocks`
    if (seen.has(b * 0x100000000 + p)) return `slot ${s} names page ${p} of block ${b} a second time`
    seen.add(b * 0x100000000 + p)
  }
  return null
}

async function checkIndex(reader: ImageReader, report: VerifyReport, rebuild: boolean): Promise<void> {
  const index = await PageIndex.openExisting(reader)
  if (index === 'inaccessible' || (index === 'missing' && !rebuild)) {
    report.index = index === 'missing' ? 'missing' : 'unchecked'
    return
  }
  if (index instanceof PageIndex) {
    let m: SnapError | null
    try {
      m = await index.check(reader)
    } finally {
      await index.close()
    }
    if (!m) {
      report.index = 'ok'
      return
    }
    if (!rebuild) {
      report.index = 'bad'
      report.problems.push({ ...problem(m), message: `${m.message}; the image itself is intact` })
      return
    }
  } else if (!rebuild) {
    report.index = 'bad'
    const what = index === 'stale' ? 'stale (it describes another image or generation)' : 'unreadable'
    report.problems.push({ code: 'SNAP_INDEX_MISMATCH', message: `the page index ${PageIndex.indexPath(reader.path)} is ${what}; the image itself is intact (verify --rebuild-index or any load rebuilds it)` })
    return
  }
  try {
    await PageIndex.build(reader)
    report.index = index === 'missing' ? 'built' : 'rebuilt'
  } catch (e) {
    report.index = 'bad'
    report.problems.push({ code: 'SNAP_INDEX_CORRUPT', message: `the page index could not be built: ${(e as Error).message}; the image itself is intact` })
  }
}
