// What an image holds, for `info` and `verify`: counts from the page locator, sizes from the
// cluster headers (format-spec/container.md, "Dead bytes"; README, "Output keys").
import { streamReport, type StreamReport } from '../report.js'
import type { StreamCounters } from '../types.js'
import { CODEC_LZ4 } from './cluster.js'
import { clusterDeadBytes } from './locator.js'
import type { ImageReader } from './reader.js'

export async function imageSummary(reader: ImageReader): Promise<ImageSummaryInfo> {
  const infos = await reader.clusterInfos()
  const locator = reader.locator
  let storedBytes = 0
  let rawBytes = 0
  let deadBytes = 0
  let lz4 = 0
  let framed = 0
  for (const c of infos) {
    storedBytes += c.storedLength
    rawBytes += c.pageCount * reader.header.pageSize
    deadBytes += clusterDeadBytes(c.storedLength, c.pageCount, locator.liveCount(c.seq))
    if (c.codec === CODEC_LZ4) lz4++
    if (c.frames > 0) framed++
  }
  const ramBlocks = reader.blocks.map((b) => {
    const { zeroPages, storedPages, basePages } = locator.counts(b.id)
    return { id: b.id, name: b.name, size: b.size, pageSize: b.pageSize, ramPages: b.size / b.pageSize, pages: zeroPages + storedPages, storedPages, zeroPages, basePages }
  })
  const sum = (k: 'pages' | 'storedPages' | 'zeroPages' | 'basePages' | 'ramPages' | 'size'): number => ramBlocks.reduce((n, b) => n + b[k], 0)
  const h = reader.header
  const info = reader.streamInfo
  return {
    version: h.version, uuid: h.uuid.toString('hex'), machine: reader.device.machine, clusterSize: h.clusterSize, pageSize: h.pageSize,
    compression: lz4 > 0 ? 'lz4' : 'none', codecs: { none: infos.length - lz4, lz4 }, framedClusters: framed,
    ramBytes: sum('size'), ramPages: sum('ramPages'), pages: sum('pages'), storedPages: sum('storedPages'), zeroPages: sum('zeroPages'),
    basePages: sum('basePages'), sharedPages: locator.totals().sharedPages,
    ramBlocks, clusters: infos.length, fileBytes: reader.fileLength, storedBytes, rawBytes, deadBytes,
    compressionRatio: storedBytes > 0 ? Math.round((100 * rawBytes) / storedBytes) / 100 : 1,
    deviceStateBytes: reader.device.config.length + reader.device.deviceSections.length + reader.device.streamEnd.length,
    createdAt: new Date(h.creationTime).toISOString(), generation: h.generation, source: info.source,
    creator: typeof info.creator === 'string' ? info.creator : undefined,
    features: { incompatible: Number(h.incompatibleFeatures), compatible: Number(h.compatibleFeatures), autoclear: Number(h.autoclearFeatures) },
    stream: streamReport(info.counters as Partial<StreamCounters>),
  }
}

/** Keys as in README, "Output keys". */
export interface ImageSummaryInfo {
  version: number
  uuid: string
  machine: string
  clusterSize: number
  pageSize: number
  compression: 'lz4' | 'none'
  codecs: { none: number; lz4: number }
  /** LZ4 clusters stored in frames (format-spec/container.md, "Frames") */
  framedClusters: number
  /** the guest's RAM: bytes and pages of all its blocks (pages QEMU never sent included) */
  ramBytes: number
  ramPages: number
  /** pages the image holds (storedPages + zeroPages) */
  pages: number
  storedPages: number
  zeroPages: number
  /** an incremental image's pages taken from its base (0 for a standalone image) */
  basePages: number
  /** stored pages in shared runs: their bytes are a slot another page (or an older copy) has (container.md "Shared slots") */
  sharedPages: number
  ramBlocks: Array<{ id: number; name: string; size: number; pageSize: number; ramPages: number; pages: number; storedPages: number; zeroPages: number; basePages: number }>
  clusters: number
  fileBytes: number
  /** page data as stored (after compression), and decoded */
  storedBytes: number
  rawBytes: number
  /** rawBytes / storedBytes, two decimals */
  compressionRatio: number
  deadBytes: number
  deviceStateBytes: number
  createdAt: string
  generation: number
  source: string
  creator?: string
  features: { incompatible: number; compatible: number; autoclear: number }
  /** what QEMU's stream held when the image was made */
  stream: StreamReport
}
