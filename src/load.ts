// `snapctl load` (precopy): image in, QEMU migration stream out.
//
// The stream is: header + configuration, ram START (block list), one ram PART holding every
// saved page once (zero runs first, then the clusters in file order), [SWITCHOVER_START],
// ram END, then the device sections and the end of stream exactly as QEMU sent them.
// Every cluster is checked (structure, checksum, decoded length) before any of its pages is
// sent; a failed check stops the stream, so QEMU never receives a wrong page.

import { unlessAborted } from './abort.js'
import { ImageReader } from './container/reader.js'
import { SnapError, isSnapError, type ErrorCode } from './errors.js'
import { refuseWhileCreating } from './container/lock.js'
import { PageIndex } from './index/page-index.js'
import { openOutput, type Output } from './output.js'
import { ThreadedOutput } from './output-thread.js'
import {
  eosFooter,
  fileHeader,
  PageRecordWriter,
  ramStartSection,
  sectionEndHeader,
  sectionPartHeader,
  switchoverStart,
} from './stream/encoder.js'
import { ZERO_CLUSTER, type PageRun } from './container/trailer.js'

export interface LoadOptions {
  /** write the stream to this file instead of standard output */
  to?: string
  force?: boolean
  /** false: leave the page index alone (the image's own page map is used either way) */
  index?: boolean
  /** after every cluster: bytes of page data sent so far, of the image's total */
  onProgress?: (pageBytesSent: number, pageBytesTotal: number) => void
  log?: (msg: string) => void
  /** stops the load: a --to file being written is removed and loadImage rejects with SNAP_ABORTED */
  signal?: AbortSignal
}

/** Keys as in README, "Output keys". */
export interface LoadResult {
  /** pages the image holds (storedPages + zeroPages) */
  pages: number
  storedPages: number
  zeroPages: number
  /** page records written (every page of the image, once) */
  pagesSent: number
  /** data clusters read */
  clusters: number
  bytesOut: number
  seconds: number
}


export async function loadImage(path: string, opts: LoadOptions = {}): Promise<LoadResult> {
  const started = performance.now()
  await refuseWhileCreating(path)
  const reader = await ImageReader.open(path)
  const opening = openOutput(opts.to, { force: opts.force })
  opening.catch(() => {})
  // Undone at once on abort (the work may be waiting on QEMU's pipe), even while the file is made.
  return unlessAborted(opts.signal, writeStream(reader, opening, opts, started), async () => (await opening.catch(() => null))?.discard())
}

async function writeStream(reader: ImageReader, opening: Promise<Output>, opts: LoadOptions, started: number): Promise<LoadResult> {
  let out: Output | undefined
  let writer: ThreadedOutput | undefined
  let done = false
  try {
    out = await opening
    const { runs, live } = await pageMapThroughIndex(reader, opts.log, opts.index)
    const rec = new PageRecordWriter(reader.blocks)
    writer = new ThreadedOutput(out.fd, out.what, (c) => rec.owns(c), (c) => rec.recycle(c))
    const pipe = new ChunkSender(writer)
    const d = reader.device
    const ramId = d.ramSectionId
    rec.raw(fileHeader(d.config))
    rec.raw(ramStartSection({ sectionId: ramId, instanceId: d.ramInstanceId, version: d.ramVersion }, reader.blocks))
    rec.raw(sectionPartHeader(ramId))

    let zeroPages = 0
    for (const run of runs) {
      if (run.cluster !== ZERO_CLUSTER) continue
      for (let p = run.firstPage; p < run.firstPage + run.pageCount; p++) rec.zero(run.blockId, p)
      zeroPages += run.pageCount
      await pipe.send(rec.take())
    }

    const pageSize = reader.header.pageSize
    let storedPages = 0
    for (const list of live.values()) for (const run of list) storedPages += run.pageCount
    let pages = 0
    for await (const cluster of reader.clusters()) {
      const mapped = live.get(cluster.seq)
      if (mapped === undefined) continue
      const list = cluster.pages
      for (const run of mapped) {
        for (let i = 0; i < run.pageCount; i++) {
          // The page map and the cluster's own page list must agree on every page sent.
          const slot = run.firstSlot + i
          if (slot >= list.length / 2 || list[2 * slot] !== run.blockId || list[2 * slot + 1] !== run.firstPage + i) {
            throw new SnapError('SNAP_CORRUPT', `the page map puts page ${run.firstPage + i} of block ${run.blockId} in slot ${slot} of cluster ${cluster.seq}, which holds another page`, { cluster: cluster.seq, offset: cluster.offset })
          }
          rec.page(run.blockId, run.firstPage + i, cluster.raw.subarray(slot * pageSize, (slot + 1) * pageSize))
          pages++
        }
      }
      await pipe.send(rec.take())
      opts.onProgress?.(pages * pageSize, storedPages * pageSize)
    }

    rec.raw(eosFooter(ramId))
    if (d.switchoverStart) rec.raw(switchoverStart())
    if (d.ramEnd) {
      rec.raw(sectionEndHeader(ramId))
      rec.raw(eosFooter(ramId))
    }
    rec.raw(d.deviceSections)
    rec.raw(d.streamEnd)
    await pipe.send(rec.flush())
    await pipe.done()
    await out.close()
    done = true
    return {
      pages: pages + zeroPages,
      storedPages: pages,
      zeroPages,
      pagesSent: pages + zeroPages,
      clusters: live.size,
      bytesOut: pipe.bytes,
      seconds: (performance.now() - started) / 1000,
    }
  } finally {
    writer?.abort()
    if (!done) await out?.discard()
    await reader.close()
  }
}

/** Index failures that do not stop a restore: the image's own page map is enough. */
const INDEX_FALLBACK: ErrorCode[] = ['SNAP_LOCKED', 'SNAP_INDEX_CORRUPT', 'SNAP_INDEX_MISMATCH', 'SNAP_IO', 'SNAP_NO_SPACE']

/**
 * The page map to restore from, and the runs of each data cluster in slot order. The trailer's
 * page map (CRC-checked, authoritative) is what is used: the index is only a cache, and an
 * index that is damaged in a way LevelDB does not notice, or forged, must never decide which
 * page goes where. It is still opened and compared, and rebuilt when missing, stale or wrong,
 * so that it stays fit for lookups; one held by another process, or that cannot be rebuilt
 * (a read-only directory), costs a note on stderr, not the restore.
 */
export async function pageMapThroughIndex(
  reader: ImageReader,
  log?: (msg: string) => void,
  index = true,
): Promise<{ runs: PageRun[]; live: Map<number, PageRun[]> }> {
  if (index) await refreshIndex(reader, log)
  const live = new Map<number, PageRun[]>()
  for (const run of reader.runs) {
    if (run.cluster === ZERO_CLUSTER) continue
    const list = live.get(run.cluster)
    if (list) list.push(run)
    else live.set(run.cluster, [run])
  }
  for (const list of live.values()) list.sort((a, b) => a.firstSlot - b.firstSlot)
  return { runs: reader.runs, live }
}

export async function refreshIndex(reader: ImageReader, log?: (msg: string) => void): Promise<void> {
  let index: PageIndex | undefined
  try {
    index = await PageIndex.open(reader, { log })
    let same: boolean | null = null
    try {
      same = await index.sameRuns(reader.runs)
    } catch (e) {
      if (!isSnapError(e, 'SNAP_INDEX_CORRUPT')) throw e
    }
    if (same) return
    const why = same === false ? "disagreed with the image's page map" : 'could not be read'
    const path = index.path
    await index.close()
    index = undefined
    try {
      await PageIndex.build(reader)
    } catch (e) {
      throw new SnapError('SNAP_INDEX_CORRUPT', `the page index ${path} ${why} and could not be rebuilt: ${(e as Error).message}`, { cause: e })
    }
    log?.(`note: the page index ${path} ${why}; rebuilt it from the image`)
  } catch (e) {
    if (isSnapError(e) && !INDEX_FALLBACK.includes(e.code)) throw e
    // One line, no error code: the restore goes on and succeeds.
    log?.(`note: the page index was not used (${(e as Error).message}); restoring from the page map in the image's trailer`)
  } finally {
    await index?.close().catch(() => {})
  }
}


/** Hands chunks to the writer thread in order. */
class ChunkSender {
  constructor(private readonly out: ThreadedOutput) {}

  get bytes(): number {
    return this.out.bytes
  }

  async send(chunks: Buffer[]): Promise<void> {
    for (const chunk of chunks) await this.out.write(chunk)
  }

  /** Everything written (or the writer's error). */
  async done(): Promise<void> {
    await this.out.close()
  }
}
