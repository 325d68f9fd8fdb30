// `snapctl load` (precopy): image in, QEMU migration stream out.
//
// The stream is: header + configuration, ram START (block list), one ram PART holding every
// saved page once (zero runs first, then the clusters in file order), [SWITCHOVER_START],
// ram END, then the device sections and the end of stream exactly as QEMU sent them.
// Every cluster is checked (structure, checksum, decoded length) before any of its pages is
// sent; a failed check stops the stream, so QEMU never receives a wrong page.

import { unlessAborted } from './abort.js'
import { openImage, topOf, type RestoreImage } from './container/chain.js'
import { pageAt, type DecodedCluster } from './container/reader.js'
import { fdOutgoing } from './transport/fd.js'
import { nativeWriteSegments, sharedBuffer } from './transport/write-segments.js'
import type { OutgoingMigration, SinkOptions } from './transport/types.js'
import {
  eosFooter,
  fileHeader,
  PAGE_HEADER_MAX,
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


const VECTOR_QUEUE_LIMIT = 4 << 20

export async function loadImage(path: string, opts: LoadOptions = {}): Promise<LoadResult> {
  const started = performance.now()
  const reader = await openImage(path, { whileCreating: 'refuse', bypassCache: opts.bypassCache })
  if (topOf(reader).source.note) opts.log?.(`note: ${topOf(reader).source.note}`)
  const rec = new PageRecordWriter(reader.blocks)
  // Chunks of the record writer's own are handed to the sink whole and come back for reuse.
  // Clusters written in place stay held until written: a few queued keep the writer busy, and
  // every one more is a fresh buffer to fault in (1 GiB: 4 MiB queued, 25,500 faults; 12 MiB, 29,700).
  const queueLimit = nativeWriteSegments() ? VECTOR_QUEUE_LIMIT : undefined
  const sink = { transferable: (c: Buffer) => rec.owns(c), returned: (c: Buffer) => rec.recycle(c), queueLimit }
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
    // Where the sink can write views of shared memory (the writer thread and the addon), a
    // cluster's pages go out where they were decoded or read, between record headers built
    // beside them (writev): no page is copied. Else each is copied into the stream chunks.
    // Either way the read and decode buffers are reused once their cluster is out.
    const vectors = writer.canWriteVector?.(sharedBuffer(1)) === true
    const headers = new SharedPool()
    const scan = vectors ? { reuse: 'manual' as const, alloc: sharedBuffer, leaveRawFrames: true } : { reuse: 'manual' as const }
    for await (const cluster of reader.clusters(scan)) {
      // Only pages whose cluster agrees with the page map (checked first) are sent.
      const slots = locator.liveSlots(cluster.seq, cluster.pages, { offset: cluster.offset })
      // Pages stored once for several places (container.md "Shared slots") go out with the cluster that holds them.
      const shared = locator.sharedPages(cluster.seq, cluster.pages, { offset: cluster.offset })
      const n = slots.length + shared.length / 3
      if (n === 0) {
        cluster.release?.()
        continue
      }
      clusters++
      const list = cluster.pages
      const raw = cluster.raw
      const stored = cluster.stored ?? raw
      if (vectors && writer.canWriteVector!(raw) && writer.canWriteVector!(stored)) {
        await send(rec.flush()) // what is before it (zero pages), in order
        const h = headers.take(n * PAGE_HEADER_MAX)
        const { segs, length } = recordSegments(rec, cluster, slots, shared, h, pageSize)
        await writer.writeVector!([h, raw, stored], segs, length, () => {
          cluster.release?.()
          headers.give(h)
        })
      } else {
        const copy = (block: number, page: number, slot: number) => {
          const [inStored, offset] = pageAt(cluster, slot, pageSize)
          rec.page(block, page, (inStored ? stored : raw).subarray(offset, offset + pageSize))
        }
        for (const slot of slots) copy(list[2 * slot], list[2 * slot + 1], slot)
        for (let i = 0; i < shared.length; i += 3) copy(shared[i + 1], shared[i + 2], shared[i])
        cluster.release?.()
        await send(rec.take())
      }
      pages += n
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

/**
 * The page records of a cluster's live slots and shared pages, in that order, as segments of
 * [h, raw, stored] (writeVector): each record's header built into `h`, its page left where the
 * cluster holds it (pageAt).
 */
function recordSegments(rec: PageRecordWriter, cluster: DecodedCluster, slots: number[] | Uint32Array, shared: number[] | Uint32Array, h: Buffer, pageSize: number): { segs: Int32Array; length: number } {
  const n = slots.length + shared.length / 3
  const segs = new Int32Array(6 * n)
  const list = cluster.pages
  let at = 0
  let k = 0
  const add = (block: number, page: number, slot: number) => {
    const end = rec.pageHeader(block, page, h, at)
    const [inStored, offset] = pageAt(cluster, slot, pageSize)
    segs[k + 1] = at
    segs[k + 2] = end - at
    segs[k + 3] = inStored ? 2 : 1
    segs[k + 4] = offset
    segs[k + 5] = pageSize
    k += 6
    at = end
  }
  for (const slot of slots) add(list[2 * slot], list[2 * slot + 1], slot)
  for (let i = 0; i < shared.length; i += 3) add(shared[i + 1], shared[i + 2], shared[i])
  return { segs, length: at + n * pageSize }
}

/** Header buffers of clusters in flight, reused once their cluster is written. */
class SharedPool {
  private readonly free: Buffer[] = []

  take(len: number): Buffer {
    const i = this.free.findIndex((b) => b.length >= len)
    return i >= 0 ? this.free.splice(i, 1)[0] : sharedBuffer(Math.max(len, 64 << 10))
  }

  give(b: Buffer): void {
    this.free.push(b)
  }
}
