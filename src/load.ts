// `snapctl load` (precopy): image in, QEMU migration stream out.
//
// The stream is: header + configuration, ram START (block list), one ram PART holding every
// saved page once (zero runs first, then the clusters in file order), [SWITCHOVER_START],
// ram END, then the device sections and the end of stream exactly as QEMU sent them.
// Every cluster is checked (structure, checksum, decoded length) before any of its pages is
// sent; a failed check stops the stream, so QEMU never receives a wrong page.

import { unlessAborted } from './abort.js'
import { openImage, topOf, type RestoreImage } from './container/chain.js'
import { fdOutgoing } from './transport/fd.js'
import type { OutgoingMigration, SinkOptions } from './transport/types.js'
import {
  eosFooter,
  fileHeader,
  PageRecordWriter,
  ramStartSection,
  sectionPartHeader,
  streamEnding,
} from './stream/encoder.js'

export interface LoadOptions {
  /** write the stream to this file instead of standard output */
  to?: string
  /** the transport to QEMU (default: standard output, or `to`): see src/transport/ */
  open?: (sink: SinkOptions) => Promise<OutgoingMigration>
  force?: boolean
  /**
   * read the image with O_DIRECT, around the host's page cache (container/direct-io.ts); a `to`
   * file is still written through the cache: it is what QEMU reads next
   */
  bypassCache?: boolean
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
  const reader = await openImage(path, { whileCreating: 'refuse', bypassCache: opts.bypassCache })
  if (topOf(reader).source.note) opts.log?.(`note: ${topOf(reader).source.note}`)
  const rec = new PageRecordWriter(reader.blocks)
  // Chunks of the record writer's own are handed to the sink whole and come back for reuse.
  const sink = { transferable: (c: Buffer) => rec.owns(c), returned: (c: Buffer) => rec.recycle(c) }
  const opening = (opts.open ?? ((s) => fdOutgoing({ to: opts.to, force: opts.force, sink: s })))(sink)
  opening.catch(() => {})
  // Undone at once on abort (the work may be waiting on QEMU's pipe), even while the file is made.
  return unlessAborted(opts.signal, writeStream(reader, rec, opening, opts, started), async () => (await opening.catch(() => null))?.discard())
}

async function writeStream(reader: RestoreImage, rec: PageRecordWriter, opening: Promise<OutgoingMigration>, opts: LoadOptions, started: number): Promise<LoadResult> {
  let out: OutgoingMigration | null = null
  let done = false
  let refresh: Promise<void> | null = null
  try {
    out = await opening
    const writer = out.main
    const locator = reader.locator
    const send = async (chunks: Buffer[]): Promise<void> => {
      for (const chunk of chunks) await writer.write(chunk)
    }
    const d = reader.device
    const ramId = d.ramSectionId
    rec.raw(fileHeader(d.config))
    rec.raw(ramStartSection({ sectionId: ramId, instanceId: d.ramInstanceId, version: d.ramVersion }, reader.blocks))
    rec.raw(sectionPartHeader(ramId))

    const { zeroPages, storedPages } = locator.totals()
    locator.forEachZero((b, p) => rec.zero(b, p))
    await send(rec.take())

    const pageSize = reader.header.pageSize
    let pages = 0
    let clusters = 0
    // Buffers reused cluster after cluster: each cluster's pages are copied into the stream chunks before the next.
    for await (const cluster of reader.clusters({ reuse: true })) {
      // Only pages whose cluster agrees with the page map (checked first) are sent.
      const slots = locator.liveSlots(cluster.seq, cluster.pages, { offset: cluster.offset })
      // Pages stored once for several places (container.md "Shared slots") go out with the cluster that holds them.
      const shared = locator.sharedPages(cluster.seq, cluster.pages, { offset: cluster.offset })
      if (slots.length === 0 && shared.length === 0) continue
      clusters++
      const list = cluster.pages
      for (const slot of slots) rec.page(list[2 * slot], list[2 * slot + 1], cluster.raw.subarray(slot * pageSize, (slot + 1) * pageSize))
      for (let i = 0; i < shared.length; i += 3) rec.page(shared[i + 1], shared[i + 2], cluster.raw.subarray(shared[i] * pageSize, (shared[i] + 1) * pageSize))
      pages += slots.length + shared.length / 3
      await send(rec.take())
      opts.onProgress?.(pages * pageSize, storedPages * pageSize)
    }

    // LevelDB is loaded and the index checked once every page is sent, while QEMU takes in the
    // device state: before the first byte it held QEMU back 0.25-0.43 s of a 1 GiB restore.
    refresh = opts.index === false ? null : import('./index/refresh.js').then((m) => m.refreshIndex(topOf(reader), opts.log))
    refresh?.catch(() => {})
    rec.raw(eosFooter(ramId))
    for (const part of streamEnding(d)) rec.raw(part)
    await send(rec.flush())
    const bytesOut = writer.bytes
    await refresh
    await out.finish()
    done = true
    return {
      pages: pages + zeroPages,
      storedPages: pages,
      zeroPages,
      pagesSent: pages + zeroPages,
      clusters,
      bytesOut,
      seconds: (performance.now() - started) / 1000,
    }
  } finally {
    await refresh?.catch(() => {}) // it reads the image: done before the image is closed
    if (!done) await out?.discard()
    await reader.close()
  }
}
