// Where a lazy restore gets a page's bytes: from a cluster the push decoded, or, for a request,
// from the one frame that holds it (format-spec/container.md, "Frames"): a request reads,
// checks and decodes one frame (128 KiB as create writes them), not the megabyte around it. Unframed clusters are read whole.
// Everything here runs on the calling thread: a request must not queue behind bulk I/O in the
// thread pool.
import type { ClusterHeader } from '../container/cluster.js'
import { disagreement, slotServes } from '../container/locator.js'
import type { RestoreImage } from '../container/chain.js'
import type { DecodedCluster } from '../container/reader.js'

/** Whole clusters kept decoded (the push's and the ones requests made us read whole). */
const CLUSTER_CACHE = 16
/** Cluster headers kept (a few KiB each). */
const HEADER_CACHE = 1024
/** Frames kept decoded (128 KiB each as create writes them: 32 MiB). */
const FRAME_CACHE = 256

export class PageFetcher {
  private readonly clusters = new Map<number, DecodedCluster>()
  private readonly headers = new Map<number, ClusterHeader>()
  private readonly frames = new Map<number, Buffer>()
  private readonly pageSize: number
  /** frames decoded for requests, and whole clusters read for them: for --stats */
  framesRead = 0
  clustersRead = 0

  constructor(private readonly reader: RestoreImage) {
    this.pageSize = reader.header.pageSize
  }

  /** A cluster the push decoded: requests for its pages are answered from it. */
  remember(c: DecodedCluster): void {
    this.clusters.set(c.seq, c)
    trim(this.clusters, CLUSTER_CACHE)
  }

  /** The whole cluster, decoded. */
  cluster(seq: number): DecodedCluster {
    let c = this.clusters.get(seq)
    if (c === undefined) {
      c = this.reader.readClusterSync(seq)
      this.remember(c)
    }
    return c
  }

  /**
   * Page (b, p) at `slot` of cluster `seq`, checked against the cluster's page list. Decoded
   * buffers are never reused: the bytes stay valid after they leave the caches.
   */
  page(seq: number, slot: number, b: number, p: number, shared = false): Uint8Array {
    const whole = this.clusters.get(seq)
    if (whole) return this.slice(whole.pages, whole.raw, slot, 0, seq, b, p, shared)
    const h = this.header(seq)
    if (!h.framePages) {
      this.clustersRead++ // not cached above: read now
      const c = this.cluster(seq)
      return this.slice(c.pages, c.raw, slot, 0, seq, b, p, shared)
    }
    const i = Math.floor(slot / h.framePages)
    const key = seq * 65536 + i
    let frame = this.frames.get(key)
    if (frame === undefined) {
      frame = this.reader.readFrameSync(seq, h, i)
      this.framesRead++
      this.frames.set(key, frame)
      trim(this.frames, FRAME_CACHE)
    }
    return this.slice(h.pages, frame, slot, i * h.framePages, seq, b, p, shared)
  }

  /** Slot `slot` out of decoded bytes that start at slot `first`, once the page list agrees (a shared page: once the slot exists). */
  private slice(pages: Uint32Array, raw: Buffer, slot: number, first: number, seq: number, b: number, p: number, shared: boolean): Uint8Array {
    if (!slotServes(pages, slot, b, p, shared)) throw disagreement(b, p, seq, slot, { offset: this.reader.clusterOffsets[seq] }, shared)
    const at = (slot - first) * this.pageSize
    return raw.subarray(at, at + this.pageSize)
  }

  private header(seq: number): ClusterHeader {
    let h = this.headers.get(seq)
    if (h === undefined) {
      h = this.reader.readClusterHeaderSync(seq)
      this.headers.set(seq, h)
      trim(this.headers, HEADER_CACHE)
    }
    return h
  }
}

function trim<K, V>(m: Map<K, V>, max: number): void {
  while (m.size > max) m.delete(m.keys().next().value as K)
}
