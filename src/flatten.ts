// `snapctl flatten IMAGE OUT`: one standalone image from a chain of incremental images
// (format-spec/container.md, "Incremental images"): every page as the chain restores it
// (data, zero, never sent), the top image's device state and stream info. The chain is only read.
import { throwIfAborted, unlessAborted } from './abort.js'
import { openImage, topOf } from './container/chain.js'
import { ImageWriter, type ImageSummary } from './container/writer.js'
import { checkOutputFile } from './paths.js'
import { resolve } from 'node:path'
import { SnapError } from './errors.js'
import type { StreamCounters } from './types.js'

export interface FlattenOptions {
  force?: boolean
  compress?: 'lz4' | 'none'
  /** default: the top image's */
  clusterSize?: number
  sync?: boolean
  signal?: AbortSignal
}

export interface FlattenResult {
  image: ImageSummary
  /** images the chain had (1: IMAGE was already standalone) */
  layers: number
  seconds: number
}

export async function flattenImage(path: string, out: string, opts: FlattenOptions = {}): Promise<FlattenResult> {
  const started = performance.now()
  await checkOutputFile(out, 'the flattened image')
  const image = await openImage(path, { whileCreating: 'refuse' })
  const layers = 'layers' in image ? image.layers : [image]
  if (layers.some((l) => resolve(l.path) === resolve(out))) {
    await image.close()
    throw new SnapError('SNAP_USAGE', `${out} is an image of the chain being flattened: a base is never replaced through its children`)
  }
  let writer: ImageWriter | null = null
  const work = async (): Promise<FlattenResult> => {
    writer = await ImageWriter.create(out, { force: opts.force, compress: opts.compress, clusterSize: opts.clusterSize ?? image.header.clusterSize, sync: opts.sync })
    const w = writer
    w.setBlocks(image.blocks)
    image.locator.forEachZero((b, p) => w.putZero(b, p))
    const ps = image.header.pageSize
    for await (const c of image.clusters({ reuse: true })) {
      throwIfAborted(opts.signal)
      for (const slot of image.locator.liveSlots(c.seq, c.pages, { offset: c.offset })) {
        w.putPage(c.pages[2 * slot], c.pages[2 * slot + 1], c.raw.subarray(slot * ps, (slot + 1) * ps))
      }
      const shared = image.locator.sharedPages(c.seq, c.pages, { offset: c.offset })
      for (let i = 0; i < shared.length; i += 3) w.putPage(shared[i + 1], shared[i + 2], c.raw.subarray(shared[i] * ps, (shared[i] + 1) * ps))
      if (w.needsDrain()) await w.drain()
    }
    const top = topOf(image)
    const info = top.streamInfo
    const summary = await w.finish(image.device, {
      source: info.source, counters: info.counters as StreamCounters, libvirtHeader: info.libvirtHeader,
      compatibleFeatures: Number(top.header.compatibleFeatures & 1n),
    })
    return { image: summary, layers: layers.length, seconds: (performance.now() - started) / 1000 }
  }
  try {
    return await unlessAborted(opts.signal, work(), async () => {
      await (writer as ImageWriter | null)?.abort()
      return 'the partial image was removed'
    })
  } catch (e) {
    await (writer as ImageWriter | null)?.abort()
    throw e
  } finally {
    await image.close()
  }
}
