// `snapctl info`: what an image holds, from its header, trailer and cluster headers
// (format-spec/container.md). An unfinished image is reported (complete: false), not refused.
import { open, stat } from 'node:fs/promises'
import { isSnapError } from './errors.js'
import { ImageReader, type ImageSummaryInfo } from './container/reader.js'
import { HEADER_SIZE, decodeHeader } from './container/header.js'
import { PageIndex } from './index/page-index.js'

export type ImageInfo =
  | ({ format: 'snapctl'; complete: true; path: string; indexPresent: boolean } & ImageSummaryInfo)
  | { format: 'snapctl'; complete: false; reason: string; path: string; fileBytes: number; uuid?: string; clusterSize?: number; machine?: string }

export async function imageInfo(path: string): Promise<ImageInfo> {
  let reader: ImageReader
  try {
    reader = await ImageReader.open(path)
  } catch (e) {
    if (isSnapError(e, 'SNAP_INCOMPLETE')) return incomplete(path, e.message)
    throw e
  }
  try {
    const summary = await reader.summary()
    const indexPresent = await stat(PageIndex.indexPath(path)).then(() => true, () => false)
    return { format: 'snapctl', complete: true, path, indexPresent, ...summary }
  } finally {
    await reader.close()
  }
}

async function incomplete(path: string, reason: string): Promise<ImageInfo> {
  const fh = await open(path, 'r')
  try {
    const { size } = await fh.stat()
    const info: ImageInfo = { format: 'snapctl', complete: false, reason, path, fileBytes: size }
    const buf = Buffer.alloc(HEADER_SIZE)
    await fh.read(buf, 0, HEADER_SIZE, 0)
    try {
      const h = decodeHeader(buf, size)
      Object.assign(info, { uuid: h.uuid.toString('hex'), clusterSize: h.clusterSize, machine: h.machine })
    } catch {
      // A create that is running or died has a zero header: nothing more to say.
    }
    return info
  } finally {
    await fh.close()
  }
}
