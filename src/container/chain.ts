// A chain of incremental images (format-spec/container.md, "Incremental images"): opened and
// checked before any page is used, then read as one image. ImageChain numbers the clusters of
// all layers one after the other (layer 0, the top, first) and keeps one RunLocator over the
// runs each layer answers for (its data and zero runs where every layer above it says "base"),
// so that load, lazy restore and flatten read a chain exactly as they read one image.
import { realpath, stat } from 'node:fs/promises'
import { dirname, isAbsolute, posix, relative, resolve } from 'node:path'
import { isAllZero } from '../bytes.js'
import { SnapError, isSnapError } from '../errors.js'
import { isS3Url } from '../s3/url.js'
import type { RamBlock } from '../types.js'
import type { BaseImageRef } from './base-image.js'
import { BASE_CLUSTER, LOC_NEVER_SENT, LOC_ZERO, RunLocator, noData, slotServes, type PageLocator, type PageRun } from './locator.js'
import { ImageReader, type ClusterResult, type DecodedCluster } from './reader.js'
import type { ClusterHeader } from './cluster.js'
import type { WriterBase } from './writer.js'

/** Images in one chain at most (container.md, "Opening a chain", step 4). */
export const MAX_CHAIN = 64

/** What restores read: one image, or a chain read as one. */
export type RestoreImage = ImageReader | ImageChain

type OpenOptions = NonNullable<Parameters<typeof ImageReader.open>[1]>

/** The image at `path`, and when it has a base, its whole chain, checked (SNAP_BASE_*). */
export async function openImage(path: string, opts: OpenOptions = {}): Promise<RestoreImage> {
  const top = await ImageReader.open(path, opts)
  if (!top.base) return top
  const layers = [top]
  try {
    const seen = new Set([top.header.uuid.toString('hex'), await realpath(path).catch(() => path)])
    for (let r = top; r.base; ) {
      if (layers.length >= MAX_CHAIN) throw new SnapError('SNAP_TOO_LARGE', `${path}: a chain of more than ${MAX_CHAIN} images`)
      r = await openBase(r, r.base, seen, opts)
      layers.push(r)
    }
    return new ImageChain(layers)
  } catch (e) {
    for (const l of layers) await l.close().catch(() => {})
    throw e
  }
}

/** The base's path as the record names it, relative to the directory of the image that names it. */
export function basePath(imagePath: string, ref: BaseImageRef): string {
  if (isS3Url(imagePath)) return ref.path.startsWith('s3://') ? ref.path : `s3://${posix.normalize(posix.join(posix.dirname(imagePath.slice(5)), ref.path))}`
  return isAbsolute(ref.path) ? ref.path : resolve(dirname(imagePath), ref.path)
}

async function openBase(child: ImageReader, ref: BaseImageRef, seen: Set<string>, opts: OpenOptions): Promise<ImageReader> {
  const path = basePath(child.path, ref)
  const real = isS3Url(path) ? path : await realpath(path).catch(() => path)
  if (seen.has(real)) throw new SnapError('SNAP_BASE_LOOP', `${child.path} names ${path} as its base, which is already in the chain`)
  let base: ImageReader
  try {
    base = await ImageReader.open(path, opts)
  } catch (e) {
    if (isSnapError(e, 'SNAP_NOT_FOUND') || isSnapError(e, 'SNAP_OBJECT_NOT_FOUND')) {
      throw new SnapError('SNAP_BASE_MISSING', `${child.path} is an incremental image whose base ${path} is missing (flatten it while the base is there to make it standalone)`)
    }
    throw e
  }
  try {
    const h = base.header
    if (!h.uuid.equals(ref.uuid) || h.generation !== ref.generation || h.fileLength !== ref.fileLength || base.footer.trailerCrc !== ref.trailerCrc) {
      throw new SnapError('SNAP_BASE_CHANGED', `${child.path} was written against ${path} with uuid ${ref.uuid.toString('hex')}, generation ${ref.generation}; ` +
        `the image there has uuid ${h.uuid.toString('hex')}, generation ${h.generation}${h.uuid.equals(ref.uuid) && h.generation === ref.generation ? ' and other bytes' : ''}: another image, or the base was changed`)
    }
    const uuid = h.uuid.toString('hex')
    if (seen.has(uuid)) throw new SnapError('SNAP_BASE_LOOP', `${child.path} names ${path} as its base, an image already in the chain (uuid ${uuid})`)
    seen.add(uuid)
    seen.add(real)
    if (!sameBlocks(base.blocks, child.blocks)) throw new SnapError('SNAP_CORRUPT', `${child.path} and its base ${path} have different RAM blocks`)
    return base
  } catch (e) {
    await base.close()
    throw e
  }
}

function sameBlocks(a: RamBlock[], b: RamBlock[]): boolean {
  return a.length === b.length && a.every((x, i) => x.name === b[i].name && x.size === b[i].size && x.pageSize === b[i].pageSize)
}

interface Span {
  block: number
  start: number
  end: number
}

/**
 * The parts of `runs` inside `mask` (null: everything), cut at the mask's edges. Both are sorted
 * by (block, page) and do not overlap. Data runs are moved by `clusterBase`.
 */
function clip(runs: readonly PageRun[], mask: Span[] | null, keep: (r: PageRun) => boolean, clusterBase: number): PageRun[] {
  const out: PageRun[] = []
  const piece = (r: PageRun, a: number, b: number) => {
    const data = !noData(r.cluster)
    const run: PageRun = { blockId: r.blockId, firstPage: a, pageCount: b - a, cluster: data ? r.cluster + clusterBase : r.cluster, firstSlot: data ? r.firstSlot + a - r.firstPage : 0 }
    if (r.shared) run.shared = true
    out.push(run)
  }
  let j = 0
  for (const r of runs) {
    if (!keep(r)) continue
    const end = r.firstPage + r.pageCount
    if (mask === null) {
      piece(r, r.firstPage, end)
      continue
    }
    while (j < mask.length && (mask[j].block < r.blockId || (mask[j].block === r.blockId && mask[j].end <= r.firstPage))) j++
    for (let k = j; k < mask.length && mask[k].block === r.blockId && mask[k].start < end; k++) {
      const a = Math.max(r.firstPage, mask[k].start)
      const b = Math.min(end, mask[k].end)
      if (a < b) piece(r, a, b)
    }
  }
  return out
}

/** The layers of a chain read as one image: clusters numbered layer after layer. */
export class ImageChain {
  readonly locator: RunLocator
  /** the first (chain-wide) cluster number of each layer */
  private readonly firsts: number[]
  readonly clusterOffsets: number[]

  constructor(readonly layers: ImageReader[]) {
    this.firsts = []
    this.clusterOffsets = []
    let runs: PageRun[] = []
    let mask: Span[] | null = null
    for (const l of layers) {
      const first = this.clusterOffsets.length
      this.firsts.push(first)
      for (const o of l.clusterOffsets) this.clusterOffsets.push(o)
      runs = runs.concat(clip(l.runs, mask, (r) => r.cluster !== BASE_CLUSTER, first))
      mask = clip(l.runs, mask, (r) => r.cluster === BASE_CLUSTER, 0).map((r) => ({ block: r.blockId, start: r.firstPage, end: r.firstPage + r.pageCount }))
    }
    runs.sort((a, b) => a.blockId - b.blockId || a.firstPage - b.firstPage)
    this.locator = new RunLocator(this.blocks.map((b) => b.size / b.pageSize), runs, this.clusterOffsets.length)
  }

  get top(): ImageReader {
    return this.layers[0]
  }
  get path(): string {
    return this.top.path
  }
  get header() {
    return this.top.header
  }
  get device() {
    return this.top.device
  }
  get blocks(): RamBlock[] {
    return this.top.blocks
  }
  get streamInfo() {
    return this.top.streamInfo
  }
  get fileLength(): number {
    return this.top.fileLength
  }

  /** Which layer (0: the top) holds chain-wide cluster `seq`. */
  layerIndex(seq: number): number {
    if (!(Number.isInteger(seq) && seq >= 0 && seq < this.clusterOffsets.length)) throw new SnapError('SNAP_CORRUPT', `there is no cluster ${seq}`, { cluster: seq })
    let i = this.firsts.length - 1
    while (this.firsts[i] > seq) i--
    return i
  }

  /** The layer that holds chain-wide cluster `seq`, and its number there. */
  private layerOf(seq: number): [ImageReader, number] {
    const i = this.layerIndex(seq)
    return [this.layers[i], seq - this.firsts[i]]
  }

  async readCluster(seq: number, into?: { stored: Buffer; raw: Buffer }): Promise<DecodedCluster> {
    const [layer, local] = this.layerOf(seq)
    return { ...(await layer.readCluster(local, into)), seq }
  }

  clusterScratch(): { stored: Buffer; raw: Buffer } {
    return this.layers.map((l) => l.clusterScratch()).reduce((a, b) => (b.raw.length > a.raw.length ? b : a))
  }

  readClusterSync(seq: number): DecodedCluster {
    const [layer, local] = this.layerOf(seq)
    return { ...layer.readClusterSync(local), seq }
  }

  /** A cluster's header alone, on the calling thread (a page request). */
  readClusterHeaderSync(seq: number): ClusterHeader {
    const [layer, local] = this.layerOf(seq)
    return layer.readClusterHeaderSync(local)
  }

  /** One frame of a framed cluster whose header was read (a page request). */
  readFrameSync(seq: number, h: ClusterHeader, i: number, into?: Buffer): Buffer {
    const [layer, local] = this.layerOf(seq)
    return layer.readFrameSync(local, h, i, into)
  }

  /** Every layer's clusters in file order, top layer first; those of which no page is used are not read. */
  async *clusterResults(opts: Parameters<ImageReader['clusterResults']>[0] = {}): AsyncGenerator<ClusterResult> {
    for (let i = 0; i < this.layers.length; i++) {
      const first = this.firsts[i]
      const n = this.layers[i].clusterOffsets.length
      let used = false
      for (let s = first; s < first + n && !used; s++) used = this.locator.liveCount(s) > 0
      if (!used) continue
      for await (const r of this.layers[i].clusterResults(opts)) {
        const seq = r.seq + first
        yield r.cluster ? { ...r, seq, cluster: { ...r.cluster, seq } } : { ...r, seq }
      }
    }
  }

  async *clusters(opts: Parameters<ImageReader['clusters']>[0] = {}): AsyncGenerator<DecodedCluster> {
    for await (const r of this.clusterResults(opts)) {
      if (r.error) throw r.error
      yield r.cluster!
    }
  }

  async close(): Promise<void> {
    for (const l of this.layers) await l.close().catch(() => {})
  }
}

/** The top image of what openImage returned (its own index, working set, records). */
export function topOf(image: RestoreImage): ImageReader {
  return image instanceof ImageChain ? image.top : image
}

/**
 * Decoded clusters kept for base comparisons, per image of the chain: the new stream comes mostly
 * in each image's own order, so a few clusters per image are enough, and the few clusters of a
 * small incremental image are not pushed out by the many of its base.
 */
const BASE_CACHE = 4

/**
 * The base of an image being written (create --base): what `image` (one image or a chain)
 * restores at each page, compared byte for byte (container.md: never by a hash alone).
 */
export function writerBase(image: RestoreImage, newImagePath: string, relativeTo = dirname(resolve(newImagePath))): WriterBase {
  const top = topOf(image)
  const h = top.header
  const where: PageLocator = image.locator.pageLocator()
  const caches = ('layers' in image ? image.layers : [image]).map(() => new Map<number, DecodedCluster>())
  const layerOf = image instanceof ImageChain ? (seq: number) => image.layerIndex(seq) : () => 0
  const ps = h.pageSize
  const cluster = (seq: number): DecodedCluster => {
    const cache = caches[layerOf(seq)]
    let c = cache.get(seq)
    if (c === undefined) {
      c = image.readClusterSync(seq)
      cache.set(seq, c)
      if (cache.size > BASE_CACHE) cache.delete(cache.keys().next().value as number)
    }
    return c
  }
  /** The base's bytes of a data page, checked against its cluster's page list. */
  const bytes = (b: number, p: number, l: number): Buffer => {
    const c = cluster(l - 1)
    const slot = where.slotOf(b, p)
    if (!slotServes(c.pages, slot, b, p, where.isShared(b, p))) throw new SnapError('SNAP_CORRUPT', `the base's page map puts page ${p} of block ${b} in a slot of cluster ${c.seq} that holds another page`)
    return c.raw.subarray(slot * ps, (slot + 1) * ps)
  }
  return {
    ref: { uuid: h.uuid, generation: h.generation, fileLength: h.fileLength, trailerCrc: top.footer.trailerCrc, path: relative(resolve(relativeTo), resolve(top.path)) },
    blocks: top.blocks,
    same(b, p, data) {
      const l = where.where(b, p)
      if (l === LOC_NEVER_SENT) return false
      if (l === LOC_ZERO) return data === null || isAllZero(data)
      const have = bytes(b, p, l)
      return data === null ? isAllZero(have) : have.equals(data)
    },
    read(b, p, into) {
      const l = where.where(b, p)
      if (l === LOC_NEVER_SENT || l === LOC_ZERO) into.fill(0, 0, ps)
      else bytes(b, p, l).copy(into, 0)
    },
  }
}

/** `--base BASE` of the image `imagePath` about to be written: opened and checked, chain and all. */
export async function openBaseFor(base: string, imagePath: string): Promise<RestoreImage> {
  if (isS3Url(base) || isS3Url(imagePath)) throw new SnapError('SNAP_BASE_MISMATCH', `--base ${base}: an incremental image and its base must be local images`)
  await stat(base).catch(() => {
    throw new SnapError('SNAP_BASE_MISSING', `--base ${base}: no such image`)
  })
  if (resolve(base) === resolve(imagePath)) throw new SnapError('SNAP_USAGE', `--base ${base} is the image being written: a base is never replaced by its child`)
  return openImage(base, { whileCreating: 'refuse' })
}
