// `snapctl load` (precopy): image in, QEMU migration stream out.
//
// The stream is: header + configuration, ram START (block list), one ram PART holding every
// saved page once (zero runs first, then the clusters in file order), [SWITCHOVER_START],
// ram END, then the device sections and the end of stream exactly as QEMU sent them.
// Every cluster is checked (structure, checksum, decoded length) before any of its pages is
// sent; a failed check stops the stream, so QEMU never receives a wrong page.

import { ImageReader } from './container/reader.js'
import { PageIndex } from './index/page-index.js'
import { openOutput, type Output } from './output.js'
import {
  eosFooter,
  fileHeader,
  PageRecordWriter,
  ramStartSection,
  sectionEndHeader,
  sectionPartHeader,
  switchoverStart,
} from './stream/encoder.js'
import type { PageRun } from './container/pagemap.js'

export interface LoadOptions {
  /** write the stream to this file instead of standard output */
  to?: string
  force?: boolean
  onProgress?: (bytesOut: number, totalPages: number, pagesSent: number) => void
  log?: (msg: string) => void
}

export interface LoadResult {
  bytesOut: number
  pages: number
  zeroPages: number
  clusters: number
  seconds: number
}

export const ZERO_CLUSTER = 0xffffffff

export async function loadImage(path: string, opts: LoadOptions = {}): Promise<LoadResult> {
  const started = performance.now()
  const reader = await ImageReader.open(path)
  let out: Output | undefined
  try {
    const { runs, live } = await pageMapThroughIndex(reader, opts.log)
    out = await openOutput(opts.to, { force: opts.force })
    const pipe = new WritePipeline(out)
    const d = reader.device
    const ramId = d.ramSectionId
    const rec = new PageRecordWriter(reader.blocks)
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
    let pages = 0
    let lastReport = performance.now()
    for await (const cluster of reader.clusters()) {
      const mask = live.get(cluster.seq)
      if (mask === undefined) continue
      const list = cluster.pages
      for (let slot = 0; slot < mask.length; slot++) {
        if (mask[slot] === 0) continue
        rec.page(list[2 * slot], list[2 * slot + 1], cluster.raw.subarray(slot * pageSize, (slot + 1) * pageSize))
        pages++
      }
      await pipe.send(rec.take())
      if (opts.onProgress && performance.now() - lastReport > 1000) {
        lastReport = performance.now()
        opts.onProgress(pipe.bytes, pages + zeroPages, pages + zeroPages)
      }
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
    out = undefined
    return {
      bytesOut: pipe.bytes,
      pages: pages + zeroPages,
      zeroPages,
      clusters: live.size,
      seconds: (performance.now() - started) / 1000,
    }
  } finally {
    await out?.close().catch(() => {})
    await reader.close()
  }
}

/**
 * The page map as the index has it (rebuilding the index from the image if it is missing or
 * stale), and for each cluster which of its slots hold live pages.
 */
export async function pageMapThroughIndex(
  reader: ImageReader,
  log?: (msg: string) => void,
): Promise<{ runs: PageRun[]; live: Map<number, Uint8Array> }> {
  const index = await PageIndex.open(reader, { log })
  try {
    const { runs, clusters } = await index.loadAll()
    const live = new Map<number, Uint8Array>()
    for (const run of runs) {
      if (run.cluster === ZERO_CLUSTER) continue
      let mask = live.get(run.cluster)
      if (mask === undefined) {
        mask = new Uint8Array(clusters[run.cluster].pageCount)
        live.set(run.cluster, mask)
      }
      mask.fill(1, run.firstSlot, run.firstSlot + run.pageCount)
    }
    return { runs, live }
  } finally {
    await index.close()
  }
}

/** Keeps one write in flight while the next chunk is being built. */
class WritePipeline {
  private inflight: Promise<void> = Promise.resolve()
  constructor(private readonly out: Output) {}

  get bytes(): number {
    return this.out.bytes
  }

  async send(chunks: Buffer[]): Promise<void> {
    for (const chunk of chunks) {
      await this.inflight
      this.inflight = this.out.write(chunk)
      // Marked handled now; the error still surfaces at the next await of `inflight`.
      this.inflight.catch(() => {})
    }
  }

  async done(): Promise<void> {
    await this.inflight
  }
}
