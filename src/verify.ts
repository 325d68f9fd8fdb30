// `snapctl verify`: read every byte of an image and check it (format-spec/container.md,
// "Reading an image" steps 1-5, the page map against each cluster's page list) and the page
// index against the image (format-spec/index.md). Problems are collected, not thrown, so that
// one damaged cluster does not hide the next.
import { stat } from 'node:fs/promises'
import { SnapError, fromSystemError, type ErrorCode } from './errors.js'
import { refuseWhileCreating } from './container/lock.js'
import { ImageReader } from './container/reader.js'
import { ZERO_CLUSTER, type PageRun } from './container/trailer.js'
import { PageIndex } from './index/page-index.js'

export interface Problem {
  code: ErrorCode
  message: string
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
  /** ok: fresh and equal to the image; built: it was missing and has been built; bad: see problems */
  index: 'ok' | 'built' | 'bad' | 'unchecked'
}

/** Errors that are not about the image's content: raised, not listed. */
const NOT_DAMAGE: ErrorCode[] = ['SNAP_NOT_FOUND', 'SNAP_IO', 'SNAP_LOCKED', 'SNAP_INTERNAL']

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
}

export async function verifyImage(path: string, opts: VerifyOptions = {}): Promise<VerifyReport> {
  const started = performance.now()
  const report: VerifyReport = {
    path, ok: false, imageOk: false, problems: [], clusters: 0, clustersOk: 0, pages: 0, zeroPages: 0, storedPages: 0,
    fileBytes: 0, storedBytes: 0, deadBytes: 0, bytesRead: 0, seconds: 0, index: 'unchecked',
  }
  const finish = () => {
    report.imageOk = !report.problems.some((p) => p.code !== 'SNAP_INDEX_MISMATCH')
    report.ok = report.problems.length === 0
    report.seconds = (performance.now() - started) / 1000
    return report
  }
  // The image (and its index) is about to be replaced: checking it now proves nothing.
  await refuseWhileCreating(path)
  let reader: ImageReader
  try {
    reader = await ImageReader.open(path)
  } catch (e) {
    if (e instanceof SnapError && NOT_DAMAGE.includes(e.code)) throw e
    report.fileBytes = (await stat(path).catch(() => ({ size: 0 }))).size
    report.problems.push(problem(e))
    return finish()
  }
  try {
    report.fileBytes = reader.fileLength
    report.clusters = reader.clusterOffsets.length
    await checkClusters(reader, report, opts.onProgress)
    if (report.problems.length === 0 && opts.index !== false) await checkIndex(reader, report)
    opts.onProgress?.(report.fileBytes, report.fileBytes)
  } finally {
    await reader.close()
  }
  return finish()
}

async function checkClusters(reader: ImageReader, report: VerifyReport, onProgress?: (d: number, t: number) => void): Promise<void> {
  const byCluster = new Map<number, PageRun[]>()
  for (const r of reader.runs) {
    if (r.cluster === ZERO_CLUSTER) {
      report.zeroPages += r.pageCount
      continue
    }
    report.storedPages += r.pageCount
    const list = byCluster.get(r.cluster)
    if (list) list.push(r)
    else byCluster.set(r.cluster, [r])
  }
  report.pages = report.zeroPages + report.storedPages
  const blockPages = reader.blocks.map((b) => b.size / b.pageSize)
  const seen = new Set<number>()
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
    seen.clear()
    let bad: string | null = null
    for (let s = 0; s < pageCount && !bad; s++) {
      const b = c.pages[2 * s]
      const p = c.pages[2 * s + 1]
      if (b >= blockPages.length || p >= blockPages[b]) bad = `slot ${s} names page ${p} of block ${b}, outside the RAM blocks`
      else if (seen.has(b * 0x100000000 + p)) bad = `slot ${s} names page ${p} of block ${b} a second time`
      seen.add(b * 0x100000000 + p)
    }
    let live = 0
    for (const r of byCluster.get(c.seq) ?? []) {
      live += r.pageCount
      for (let i = 0; i < r.pageCount && !bad; i++) {
        const s = r.firstSlot + i
        if (s >= pageCount || c.pages[2 * s] !== r.blockId || c.pages[2 * s + 1] !== r.firstPage + i) {
          bad = `the page map puts page ${r.firstPage + i} of block ${r.blockId} in slot ${s}, which holds another page`
        }
      }
    }
    if (bad) report.problems.push({ code: 'SNAP_CORRUPT', message: `cluster ${c.seq} at offset ${c.offset}: ${bad}`, ...where })
    else report.clustersOk++
    report.deadBytes += Math.floor((c.storedLength * Math.max(0, pageCount - live)) / pageCount)
  }
  report.bytesRead = reader.fileLength
}

async function checkIndex(reader: ImageReader, report: VerifyReport): Promise<void> {
  const existed = await stat(PageIndex.indexPath(reader.path)).then(() => true, () => false)
  let index: PageIndex
  try {
    index = await PageIndex.open(reader, { rebuild: false })
  } catch (e) {
    if (!(e instanceof SnapError) || (e.code !== 'SNAP_INDEX_MISMATCH' && e.code !== 'SNAP_INDEX_CORRUPT')) throw e
    report.index = 'bad'
    report.problems.push({ code: 'SNAP_INDEX_MISMATCH', message: `${e.message}; the image itself is intact` })
    return
  }
  try {
    const m = await index.check(reader)
    if (m) {
      report.index = 'bad'
      report.problems.push({ ...problem(m), message: `${m.message}; the image itself is intact` })
    } else report.index = existed ? 'ok' : 'built'
  } finally {
    await index.close()
  }
}
